"""Worker hosts across a network: Linux network namespaces, emulated links, a PostgreSQL of our own.

Shared by tests/test_network.py and bench/network.py (issue 13, "Across a network"). The topology:

    root namespace ("db host")                      namespace bdn<S>-w<i> ("worker host" i)
    10.213.<S>.1 on bridge bdn<S>-br (an anchor, no ports)
      PostgreSQL (its own cluster, listening there)
      the provider simulator (bound there)
      route 10.213.<S>.1<i>/32 via bdn<S>-h<i> ==== emulated cable ==== bdn<S>-p<i>: 10.213.<S>.1<i>/24

Every byte between a worker host and the database or the simulator crosses its cable, which
bench/link_emulator.py delays and drops in userspace (per direction; `set_link`). Processes in the
root namespace (the test, the benchmark) reach 10.213.<S>.1 over loopback, undelayed. Nothing listens
on any other address: traffic stays on the namespaces' own addresses and loopback.

<S> is a slot, 0-63: a run holds `slot-<S>.lock` (flock) in STATE_DIR while its topology exists, so
runs side by side take different slots (names, subnets). Whatever a slot's previous holder left
behind (it was killed: namespaces, processes inside them, its PostgreSQL server) is cleaned when the
slot is taken, and `clean_stale()` cleans every slot nobody holds. The emulator's TUN devices vanish
with it and it dies with its parent; the bridge is deleted by name.

The PostgreSQL server is batchdb's own embedded binaries (batchdb/embedded.py's initdb/pg_ctl wrappers
and settings; as root it runs as the `embedded_postgres` OS user), initdb'd in a temp dir and
listening on 10.213.<S>.1 only (no Unix socket): never the machine's server on 127.0.0.1:5432.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import psycopg
from psycopg.conninfo import make_conninfo

SUBNET = "10.213"
SLOTS = 64
NAME_PREFIX = "bdn"  # every namespace and link of every run starts with it
STATE_DIR = Path("/run/batchdb-netns") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "batchdb-netns"
EMULATOR = Path(__file__).with_name("link_emulator.py")
PG_PORT = 5432  # on the slot's own address: no clash with anything on 127.0.0.1


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): the tests skip with this reason."""
    if sys.platform != "linux":
        return f"network namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root, as CI does"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


# -- slots and stale runs ------------------------------------------------------------------------


def _slot_names(slot: int) -> str:
    return f"{NAME_PREFIX}{slot}-"


def _state_file(slot: int) -> Path:
    return STATE_DIR / f"slot-{slot}.json"


def _try_lock(slot: int) -> IO[str] | None:
    """The slot's lock file, locked (kept open by the caller), or None when another run holds it."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    handle = open(STATE_DIR / f"slot-{slot}.lock", "a")  # noqa: SIM115 - held for the topology's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _clean_slot(slot: int) -> None:
    """Remove what an earlier (dead) holder of `slot` left: call with the slot's lock held."""
    prefix = _slot_names(slot)
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(_state_file(slot).read_text())
        _stop_postgres(Path(state["pg_home"]))
    for namespace in _ip("netns", "list", check=False).stdout.split("\n"):
        name = namespace.split(" ")[0]
        if name.startswith(prefix):
            _kill_namespace_processes(name)
            _ip("netns", "delete", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(prefix):
            _ip("link", "delete", name, check=False)
    _state_file(slot).unlink(missing_ok=True)


def _kill_namespace_processes(namespace: str) -> None:
    pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([p for p in map(_process, pids) if p is not None], timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def clean_stale() -> list[int]:
    """Clean every slot no live run holds (namespaces, links, servers of killed runs); returns them."""
    cleaned = []
    used = {int(n.split("-")[0][len(NAME_PREFIX) :]) for n in _names_in_use() if n[len(NAME_PREFIX) :][:1].isdigit()}
    for slot in sorted(used | _slots_with_state()):
        handle = _try_lock(slot)
        if handle is None:
            continue  # a live run's
        try:
            _clean_slot(slot)
            cleaned.append(slot)
        finally:
            handle.close()
    return cleaned


def _names_in_use() -> list[str]:
    names = [line.split(" ")[0] for line in _ip("netns", "list", check=False).stdout.splitlines()]
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        if ":" in line:
            names.append(line.split(":")[1].strip().split("@")[0])
    return [n for n in names if n.startswith(NAME_PREFIX) and "-" in n]


def _slots_with_state() -> set[int]:
    if not STATE_DIR.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in STATE_DIR.glob("slot-*.json") if p.stem.split("-")[1].isdigit()}


# -- PostgreSQL ------------------------------------------------------------------------------------


def _start_postgres(home: Path, host: str, subnet: str, settings: Mapping[str, str]) -> None:
    """initdb a cluster in home/pg (as batchdb's embedded server does) and start it on `host` only."""
    from batchdb import embedded

    data_dir = home / "pg"
    data_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        embedded._open_paths_to_server_user(home)
        embedded._open_paths_to_server_user(data_dir)
    init_settings = {**embedded.SERVER_SETTINGS, "max_connections": "300"}
    init_args = [arg for name, value in init_settings.items() for arg in ("-c", f"{name}={value}")]
    embedded.initdb(embedded.INITDB_ARGS + init_args, pgdata=data_dir, **embedded._run_as(home))
    # initdb trusts loopback only; the worker hosts connect from the slot's subnet.
    with (data_dir / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {subnet} trust\n")
    options = {"listen_addresses": host, "port": str(PG_PORT), "unix_socket_directories": "", **settings}
    quoted = " ".join(f"-c {shlex.quote(f'{name}={value}')}" for name, value in options.items())
    embedded.pg_ctl(
        ["-w", "-t", "60", "-l", str(home / "server.log"), "-o", quoted, "start"],
        pgdata=data_dir,
        timeout=90,
        **embedded._run_as(home),
    )


def _stop_postgres(home: Path) -> None:
    """Stop the server of `home` (immediate: a test server has nothing to keep) and delete its files."""
    pid_file = home / "pg" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pid_file.read_text().splitlines()[0])
        process = psutil.Process(pid)
        if process.name().startswith("postgres"):
            process.send_signal(signal.SIGQUIT)  # immediate shutdown; children go with it
            psutil.wait_procs([process], timeout=30)
    shutil.rmtree(home, ignore_errors=True)


# -- the topology ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One worker host: a network namespace behind its own emulated cable."""

    index: int
    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host (`ip netns exec` execs it: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


class NetworkHosts:
    """`n_hosts` worker hosts, a PostgreSQL server and the cables between them. Use as a context manager:
    everything is removed on exit, whatever happened (and by the next run, if this one was killed)."""

    def __init__(
        self, n_hosts: int = 3, *, postgres_settings: Mapping[str, str] | None = None, log: IO[str] | None = None
    ) -> None:
        self.n_hosts = n_hosts
        self.postgres_settings = dict(postgres_settings or {})
        self._log = log or sys.stderr
        self._lock: IO[str] | None = None
        self._emulator: subprocess.Popen[str] | None = None
        self._pg_home: Path | None = None
        self.slot = -1
        self.hosts: list[Host] = []
        self.links: list[tuple[float, float]] = []

    # -- addresses ------------------------------------------------------------------------------

    @property
    def db_address(self) -> str:
        """The db host's address: PostgreSQL and the simulator listen here."""
        return f"{SUBNET}.{self.slot}.1"

    @property
    def admin_dsn(self) -> str:
        return make_conninfo(host=self.db_address, port=PG_PORT, user="postgres", dbname="postgres")

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    # -- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> NetworkHosts:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        clean_stale()
        for slot in range(SLOTS):
            self._lock = _try_lock(slot)
            if self._lock is not None:
                self.slot = slot
                break
        else:
            raise RuntimeError(f"all {SLOTS} network slots are held by live runs")
        _clean_slot(self.slot)
        prefix = _slot_names(self.slot)
        self._pg_home = Path(tempfile.mkdtemp(prefix=f"batchdb-netns-{self.slot}-"))
        _state_file(self.slot).write_text(json.dumps({"pid": os.getpid(), "pg_home": str(self._pg_home)}))

        bridge = f"{prefix}br"
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{self.db_address}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")

        pairs = [f"{prefix}h{i}:{prefix}p{i}" for i in range(self.n_hosts)]
        self._emulator = subprocess.Popen(
            [sys.executable, str(EMULATOR), *pairs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C of the run reaches it through our cleanup, not at random
        )
        assert self._emulator.stdout is not None
        if self._emulator.stdout.readline().strip() != "ready":
            raise RuntimeError(f"link emulator failed to start (exit {self._emulator.wait()})")
        for i in range(self.n_hosts):
            namespace, address = f"{prefix}w{i}", f"{SUBNET}.{self.slot}.{10 + i}"
            outside, inside = f"{prefix}h{i}", f"{prefix}p{i}"
            _ip("netns", "add", namespace)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "up")
            _ip("route", "add", f"{address}/32", "dev", outside, "src", self.db_address)
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", namespace, "link", "set", inside, "up")
            self.hosts.append(Host(i, namespace, address))
            self.links.append((0.0, 0.0))
        _start_postgres(self._pg_home, self.db_address, f"{SUBNET}.{self.slot}.0/24", self.postgres_settings)

    def close(self) -> None:
        """Remove everything, in the order that cannot leave a process holding a namespace."""
        try:
            for host in self.hosts:
                _kill_namespace_processes(host.namespace)
            if self._pg_home is not None:
                _stop_postgres(self._pg_home)
            if self._emulator is not None:
                if self._emulator.stdin is not None:
                    self._emulator.stdin.close()
                try:
                    self._emulator.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._emulator.kill()
                    self._emulator.wait()
                if self._emulator.stdout is not None:
                    self._emulator.stdout.close()
            if self.slot >= 0 and self._lock is not None:
                _clean_slot(self.slot)
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    # -- the cables ------------------------------------------------------------------------------

    def set_link(self, index: int, *, delay_s: float, loss: float = 0.0) -> None:
        """Host `index`'s cable from now on: `delay_s` each way (RTT = 2 x delay), `loss` per packet each way."""
        assert self._emulator is not None and self._emulator.stdin is not None and self._emulator.stdout is not None
        self._emulator.stdin.write(f"set {index} {delay_s} {loss}\n")
        self._emulator.stdin.flush()
        answer = self._emulator.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"link emulator: {answer or 'exited'}")
        self.links[index] = (delay_s, loss)

    def set_all(self, *, delay_s: float, loss: float = 0.0) -> None:
        for host in self.hosts:
            self.set_link(host.index, delay_s=delay_s, loss=loss)

    def partition(self, index: int) -> tuple[float, float]:
        """Cut host `index` off: every packet either way is lost (netem's loss 100%). Returns the link as it was."""
        before = self.links[index]
        self.set_link(index, delay_s=before[0], loss=1.0)
        self.links[index] = before
        return before

    def heal(self, index: int) -> None:
        delay_s, loss = self.links[index]
        self.set_link(index, delay_s=delay_s, loss=loss)

    # -- databases -------------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@contextlib.contextmanager
def network_hosts(n_hosts: int = 3, **kwargs: object) -> Iterator[NetworkHosts]:
    with NetworkHosts(n_hosts, **kwargs) as hosts:  # type: ignore[arg-type]
        yield hosts


def wait_for(predicate: object, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    """Poll `predicate()` until true; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
