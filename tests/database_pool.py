"""Per-test databases made ahead of time and dropped behind, off the tests' critical path.

Every test that asks for `dsn` gets a database of its own, a fresh clone of the session's migrated
template, exactly as before: nothing is reused, so a test never sees another's rows, sequences,
settings, partitions or notifications (roles are cluster-wide and each test drops the ones it made).
What moved is *when* the clone is made and dropped: a background thread clones the next tests'
databases while the current test runs, and three threads drop finished tests' databases while the
next ones run; the session's end drops what is left. On PostgreSQL 15 every DROP DATABASE forces an
immediate checkpoint of the whole server. Measured on tests/test_queue.py, test_jobs.py,
test_ledger.py, test_results.py (+ test_events.py): 35 tests at load 17-25, 86-106 s before, 56-67 s
after; 37 tests at load 3-4, 43-45 s before, 31-35 s after (0.3 s a test). Concurrent drops share
one checkpoint. Tests marked `slow` (the
timing-sensitive ones) start only once that background work is done (`settle`), so a forced
checkpoint never lands in their measurements, as it never did when the fixture dropped the
database before the next test started.
"""

from __future__ import annotations

import queue
import threading
import uuid
from typing import Final

import psycopg
from psycopg.conninfo import make_conninfo

PREFIX: Final = "batchdb_t_"


class TestDatabases:
    """Clones of `template` on `admin_dsn`, `ahead` of them kept ready; `take` one, `give_back` it.

    Two threads: one clones, one drops. A drop can take seconds on a busy server (it waits for every
    backend to release the database's files), and a test waiting for its clone must not wait for it.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, admin_dsn: str, template: str, ahead: int = 2, droppers: int = 3) -> None:
        self._admin_dsn = admin_dsn
        self._template = template
        self._to_create: queue.Queue[bool] = queue.Queue()  # False: stop
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._to_drop: queue.Queue[str | None] = queue.Queue()  # None: stop
        self._errors: list[BaseException] = []  # drops that failed, raised by close()
        self.made: list[str] = []  # every clone made, in order
        self._threads = [
            threading.Thread(target=self._creating, name="test-databases-create", daemon=True),
            *(
                threading.Thread(target=self._dropping, name="test-databases-drop", daemon=True)
                for _ in range(droppers)
            ),
        ]
        for thread in self._threads:
            thread.start()
        for _ in range(ahead):
            self._to_create.put(True)

    def dsn(self, name: str) -> str:
        return make_conninfo(self._admin_dsn, dbname=name)

    def take(self) -> str:
        """A fresh clone nobody has connected to yet (its name); orders the next one made."""
        self._to_create.put(True)
        made = self._ready.get()
        if isinstance(made, BaseException):
            raise made
        return made

    def give_back(self, name: str) -> None:
        """Drop `name` soon, whoever is still connected to it (WITH FORCE, as the fixture always did)."""
        self._to_drop.put(name)

    def settle(self) -> None:
        """Wait until every clone ordered is made and every database given back is dropped.

        For timing-sensitive tests: a drop's forced checkpoint must not land in a measurement.
        """
        self._to_create.join()
        self._to_drop.join()

    def close(self) -> None:
        """Drop every database this pool made and stop its threads; raise the first failed drop."""
        self._to_create.put(False)
        self._threads[0].join()
        while not self._ready.empty():
            made = self._ready.get()
            if isinstance(made, str):
                self._to_drop.put(made)
        for _ in self._threads[1:]:
            self._to_drop.put(None)  # one each: any of them may take any of these
        for thread in self._threads[1:]:
            thread.join()
        if self._errors:
            raise self._errors[0]

    def _creating(self) -> None:
        while self._to_create.get():
            try:
                self._ready.put(self._create())
            except BaseException as error:  # noqa: BLE001 (handed to the test that takes it)
                self._ready.put(error)
            finally:
                self._to_create.task_done()

    def _dropping(self) -> None:
        while (name := self._to_drop.get()) is not None:
            try:
                self._drop(name)
            except BaseException as error:  # noqa: BLE001 (reported at the session's end)
                self._errors.append(error)
            finally:
                self._to_drop.task_done()

    def _create(self) -> str:
        name = f"{PREFIX}{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self._admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        self.made.append(name)
        return name

    def _drop(self, name: str) -> None:
        with psycopg.connect(self._admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
