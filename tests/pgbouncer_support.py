"""A small PostgreSQL (batchdb's embedded server in a temporary home) and a PgBouncer in front of it.

Used by tests/test_pgbouncer.py. PgBouncer refuses to run as root, so as root it runs as the
embedded server's OS user, from files that user owns. Its binary is Debian's
(`apt-get install pgbouncer`, /usr/sbin/pgbouncer; .ci/run installs it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from batchdb import embedded

PGBOUNCER_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next((p for p in PGBOUNCER_PATHS if os.access(p, os.X_OK)), None)


@dataclass(frozen=True)
class Pooled:
    """The server (direct) and the pooler in front of it, both to database `batchdb`."""

    direct_dsn: str
    pooled_dsn: str
    pooler_log: Path
    server_log: Path


@contextlib.contextmanager
def small_server(max_connections: int) -> Iterator[embedded.EmbeddedServer]:
    """An embedded PostgreSQL in a temporary BATCHDB_HOME with `max_connections`; stopped and deleted on exit."""
    home = Path(tempfile.mkdtemp(prefix="batchdb-pgb-")).resolve()
    os.chmod(home, 0o755)
    saved = os.environ.get("BATCHDB_HOME")
    os.environ["BATCHDB_HOME"] = str(home)
    try:
        server = embedded.ensure_server()
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET max_connections = {int(max_connections)}")
        embedded.stop_server()
        yield embedded.ensure_server()  # the same port again (server.json)
    finally:
        try:
            embedded.stop_server()
        finally:
            if saved is None:
                os.environ.pop("BATCHDB_HOME", None)
            else:
                os.environ["BATCHDB_HOME"] = saved
            shutil.rmtree(home, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def pgbouncer(
    server_port: int,
    *,
    pool_size: int,
    max_client_conn: int = 2000,
    server_host: str = "127.0.0.1",
    ignore_startup_parameters: str = "",
) -> Iterator[tuple[int, Path]]:
    """PgBouncer in transaction pooling mode on a free port in front of `server_host`:`server_port`;
    yields its port and log file. Its defaults otherwise: `options` is refused, not ignored,
    unless `ignore_startup_parameters` names it."""
    binary = pgbouncer_binary()
    assert binary is not None, "pgbouncer is not installed (apt-get install pgbouncer)"
    folder = Path(tempfile.mkdtemp(prefix="batchdb-pgbouncer-")).resolve()
    os.chmod(folder, 0o755)
    port = _free_port()
    log = folder / "pgbouncer.log"
    (folder / "userlist.txt").write_text('"postgres" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / "userlist.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_client_conn}
logfile = {log}
log_connections = 0
log_disconnections = 0
ignore_startup_parameters = {ignore_startup_parameters}
"""
    )
    run_as: dict[str, object] = {}
    if os.geteuid() == 0:  # "PgBouncer should not run as root"
        user = pwd.getpwnam(embedded.SERVER_OS_USER)  # the embedded server made it
        for path in folder.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    process = subprocess.Popen(
        [binary, str(folder / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=folder,
        **run_as,  # type: ignore[arg-type]
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {log.read_text() if log.exists() else ''}") from None
                time.sleep(0.05)
        yield port, log
    finally:
        process.terminate()  # SIGTERM: immediate shutdown
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def pooled_database(*, max_connections: int, pool_size: int) -> Iterator[Pooled]:
    """The embedded server with `max_connections` and PgBouncer (`pool_size` per database and user)."""
    with small_server(max_connections) as server, pgbouncer(server.port, pool_size=pool_size) as (port, log):
        pooled = make_conninfo(server.dsn, port=port)
        yield Pooled(direct_dsn=server.dsn, pooled_dsn=pooled, pooler_log=log, server_log=server.log_file)


@contextlib.contextmanager
def in_front_of(dsn: str, *, pool_size: int = 5, ignore_startup_parameters: str = "") -> Iterator[str]:
    """PgBouncer (transaction mode) in front of the server of `dsn`; yields `dsn` through it."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    server_port = int(params.get("port") or 5432)
    ignore = ignore_startup_parameters
    with pgbouncer(server_port, pool_size=pool_size, server_host=host, ignore_startup_parameters=ignore) as (port, _):
        yield make_conninfo(dsn, host="127.0.0.1", port=port)
