"""Connections through a transaction-pooling PgBouncer (or another pooler that behaves like it).

In transaction pooling, each transaction of a client may run on a different server connection,
and the server connection outlives the client. What lives in a session therefore does not
survive from one statement to the next, and batchdb relied on three such things:

- the startup parameter `options` (`-c jit=off`, and for workers `-c plan_cache_mode=...`):
  PgBouncer refuses it ("unsupported startup parameter: options") unless
  `ignore_startup_parameters` lists it, and then it is dropped silently. Through a pooler batchdb
  connects without it. `plan_cache_mode` is moot there (next point); for the others (`jit=off`,
  the dashboard's read-only and statement timeout) the operator sets them on the database or role
  (`ALTER DATABASE ... SET jit = off`), which PostgreSQL applies to every server connection
  PgBouncer opens. batchdb compares them once per process and logs a warning for each that does
  not hold, instead of letting a 200 ms JIT compile per claim go unexplained.
- prepared statements: psycopg prepares a statement the fifth time it runs; PgBouncer before
  1.21 does not carry them between server connections ("prepared statement "_pg3_0" does not
  exist"). Through a pooler `prepare_threshold=None`: each statement is sent unnamed and planned
  with its real parameters every time, which is what `plan_cache_mode=force_custom_plan` asked for.
- LISTEN: notifications go to the server connection that ran LISTEN, which the pooler hands to
  whoever comes next. `listen_conninfo` gives `BATCHDB_LISTEN_DSN` (a direct connection to the
  server) when set, else None through a pooler: the listeners then only poll (every NOTIFY batchdb
  sends is a wake-up hint beside a poll; `batchdb watch` alone needs LISTEN and says so).

Session advisory locks and temporary tables that outlive a transaction are not used anywhere
(the vacuumer takes `VACUUM (SKIP_LOCKED)`, the staging table is `ON COMMIT DROP`, migrations take
a transaction-scoped lock).

Which connections go through a pooler is `BATCHDB_POOLER`: `transaction` (every DSN), `none`
(never) or `auto` (the default): a DSN is taken as pooled once a connection to it was refused for
its `options` (PgBouncer's answer in its default configuration), then re-opened without them.
A pooler configured to ignore `options` cannot be told from a server: set `transaction` there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import tuple_row

from batchdb import settings

log = logging.getLogger(__name__)

AUTO, NONE, TRANSACTION = "auto", "none", "transaction"
MODES = (AUTO, NONE, TRANSACTION)

# PgBouncer's refusal of a startup parameter it does not know (src/client.c), e.g. `options`.
REFUSED_PARAMETER = "unsupported startup parameter"

# Settings that do not matter without prepared statements (an unnamed statement is always planned
# with its parameters), so their absence through a pooler is not worth a warning.
MOOT_WHEN_POOLED = frozenset({"plan_cache_mode"})

# Endpoints (host:port) this process saw refuse `options` (auto mode).
_refused: set[str] = set()
# (database DSN without options, setting) pairs already compared, so each is checked and warned about once.
_checked: set[tuple[str, str]] = set()


def mode(env: Mapping[str, str] | None = None) -> str:
    """`BATCHDB_POOLER`, lower-cased; `auto` when unset (settings.environment_problems checks it)."""
    env = os.environ if env is None else env
    value = (env.get(settings.POOLER) or AUTO).strip().lower()
    return value if value in MODES else AUTO


def without_options(conninfo: str) -> str:
    """`conninfo` without its `options`."""
    params = conninfo_to_dict(conninfo)
    params.pop("options", None)
    return make_conninfo("", **params)


def endpoint(conninfo: str) -> str:
    """Where `conninfo` connects (host and port, libpq's defaults when absent): a pooler listens
    there for every database, user and application name alike."""
    params = conninfo_to_dict(conninfo)
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "(socket)"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def is_pooled(conninfo: str) -> bool:
    """Whether connections to `conninfo` go through a transaction pooler, as far as this process
    knows (in auto mode: once a connection to its endpoint was refused for its options)."""
    current = mode()
    if current == AUTO:
        return endpoint(conninfo) in _refused
    return current == TRANSACTION


def connect_kwargs(conninfo: str) -> dict[str, Any]:
    """psycopg connect arguments for `conninfo`: itself when direct; through a pooler, without
    its `options` and with server-side prepared statements off."""
    if is_pooled(conninfo):
        return {"conninfo": without_options(conninfo), "prepare_threshold": None}
    return {"conninfo": conninfo}


def requested_settings(conninfo: str) -> dict[str, str]:
    """The `-c name=value` (or `--name=value`) settings in the `options` of `conninfo`."""
    words = str(conninfo_to_dict(conninfo).get("options") or "").split()
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        if word == "-c" and i + 1 < len(words):
            word = words[i + 1]
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            continue
        name, sep, value = word.partition("=")
        if sep:
            found[name.replace("-", "_")] = value
    return found


def refused_for_options(exc: psycopg.Error) -> bool:
    """The pooler refused the connection for a startup parameter (PgBouncer: `options`)."""
    return REFUSED_PARAMETER in str(exc)


def _note_refusal(conninfo: str, exc: psycopg.OperationalError) -> bool:
    """Remember a pooler's refusal of `options` (auto mode); whether to connect again without."""
    if mode() != AUTO or "options" not in conninfo_to_dict(conninfo) or not refused_for_options(exc):
        return False
    key = endpoint(conninfo)
    if key not in _refused:
        _refused.add(key)
        log.info("the server refused startup options: a pooler (PgBouncer); connecting without them")
    return True


def _to_check(conninfo: str) -> dict[str, str]:
    """The requested settings of a pooled connection not compared yet in this process."""
    key = without_options(conninfo)
    wanted = {n: v for n, v in requested_settings(conninfo).items() if n not in MOOT_WHEN_POOLED}
    fresh = {n: v for n, v in wanted.items() if (key, n) not in _checked}
    _checked.update((key, n) for n in fresh)
    return fresh


def _warn_unset(conninfo: str, wanted: Mapping[str, str], actual: Mapping[str, str]) -> None:
    dbname = conninfo_to_dict(conninfo).get("dbname") or "<database>"
    for name, value in wanted.items():
        if name in actual and actual[name] != value:
            log.warning(
                "through the pooler %s=%s cannot be set per connection and the server has %s=%s; "
                'set it for the database or role: ALTER DATABASE "%s" SET %s = %s (or ALTER ROLE ... SET)',
                name,
                value,
                name,
                actual[name],
                dbname,
                name,
                value,
            )


SETTINGS_QUERY = "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)"


def connect(conninfo: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg.connect for a batchdb connection with its session `options` in `conninfo`,
    through a pooler as `connect_kwargs` says (detecting one in auto mode)."""
    try:
        conn = psycopg.connect(**connect_kwargs(conninfo), **kwargs)
    except psycopg.OperationalError as exc:
        if not _note_refusal(conninfo, exc):
            raise
        conn = psycopg.connect(**connect_kwargs(conninfo), **kwargs)
    if is_pooled(conninfo) and (wanted := _to_check(conninfo)):
        try:
            rows = conn.cursor(row_factory=tuple_row).execute(SETTINGS_QUERY, (list(wanted),)).fetchall()
            if not conn.autocommit:
                conn.rollback()
        except BaseException:
            conn.close()
            raise
        _warn_unset(conninfo, wanted, dict(rows))
    return conn


async def connect_async(conninfo: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """`connect` for asyncio."""
    try:
        conn = await psycopg.AsyncConnection.connect(**connect_kwargs(conninfo), **kwargs)
    except psycopg.OperationalError as exc:
        if not _note_refusal(conninfo, exc):
            raise
        conn = await psycopg.AsyncConnection.connect(**connect_kwargs(conninfo), **kwargs)
    if is_pooled(conninfo) and (wanted := _to_check(conninfo)):
        try:
            cur = await conn.cursor(row_factory=tuple_row).execute(SETTINGS_QUERY, (list(wanted),))
            rows = await cur.fetchall()
            if not conn.autocommit:
                await conn.rollback()
        except BaseException:
            await conn.close()
            raise
        _warn_unset(conninfo, wanted, dict(rows))
    return conn


def listen_conninfo(conninfo: str) -> str | None:
    """Where to LISTEN for `conninfo`'s notifications: `BATCHDB_LISTEN_DSN` when set; else
    `conninfo` itself unless it goes through a pooler (None: poll instead).

    In auto mode, ask after a connection to `conninfo` was made: only then is a pooler known.
    """
    direct = os.environ.get(settings.LISTEN_DSN)
    if direct:
        return direct
    return None if is_pooled(conninfo) else conninfo


def listen_connect(conninfo: str, **kwargs: Any) -> psycopg.Connection[Any] | None:
    """A connection to LISTEN on for the database of `conninfo` (with its session options):
    `BATCHDB_LISTEN_DSN` when set, else one to `conninfo` unless that turns out to go through a
    pooler, where a LISTEN would be lost: None, and the caller polls."""
    if direct := os.environ.get(settings.LISTEN_DSN):
        return psycopg.connect(direct, **kwargs)
    conn = connect(conninfo, **kwargs)
    if is_pooled(conninfo):
        conn.close()
        return None
    return conn


async def listen_connect_async(conninfo: str, **kwargs: Any) -> psycopg.AsyncConnection[Any] | None:
    """`listen_connect` for asyncio."""
    if direct := os.environ.get(settings.LISTEN_DSN):
        return await psycopg.AsyncConnection.connect(direct, **kwargs)
    conn = await connect_async(conninfo, **kwargs)
    if is_pooled(conninfo):
        await conn.close()
        return None
    return conn


async def pool_kwargs_async(conninfo: str) -> dict[str, Any]:
    """`connect_kwargs` for a connection pool (psycopg_pool) that opens its connections itself and
    so cannot retry a refusal: in auto mode one connection is opened first to find out."""
    if mode() == AUTO and endpoint(conninfo) not in _refused:
        conn = await connect_async(conninfo)
        await conn.close()
    return connect_kwargs(conninfo)
