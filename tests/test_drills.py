"""Fault drills, small: a real job through worker processes while something breaks (bench/drills.py).

Each test asserts the drill's invariants: every row final and none lost, no row with two
results, job totals equal to the sum of rows, duplicate provider calls within the rows in
flight at the fault. `python -m bench.drills` runs the full-size versions and prints the table.
"""

from __future__ import annotations

import re

import pytest

from bench import drills

# A drill is a whole job through worker processes: minutes on a busy 2-core machine (two CPU burners
# beside the suite took one past the default 300 s). The limit guards against a hang, not a slow machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The drills' faults start at a share of the rows done, so they run at half size, each with its own
# evidence that the fault really happened (a drill that injects nothing must not pass); the outage
# drill keeps 2,000 rows: its bound on attempts per row (1.02) holds the rows in flight at the
# outage's start, which 1,000 rows do not dilute enough (1.025 measured).
ROWS = 2_000
SMALL = 1_000
WORKERS = 2


def assert_drill_passed(result: drills.DrillResult) -> None:
    assert result.check.violations == [], result.cells()
    assert result.check.lost == 0
    assert 0 <= result.check.duplicates <= result.bound


def test_random_sigkills_lose_nothing(dsn: str) -> None:
    result = drills.drill_sigkill(drills.Setup(dsn, SMALL, WORKERS), every_s=2.0, max_kills=6)
    assert_drill_passed(result)
    assert not result.note.startswith("0 kills")
    assert result.bound > 0  # the killed workers held rows: the drill exercised reclaim


def test_database_restart_mid_job(monkeypatch: pytest.MonkeyPatch) -> None:
    # An embedded server in a temporary home, never the shared server: stop_server + ensure_server.
    monkeypatch.delenv("BATCHDB_HOME", raising=False)
    with drills.embedded_database() as dsn:
        result = drills.drill_db_restart(drills.Setup(dsn, SMALL, WORKERS), down_s=2.0)
    assert_drill_passed(result)  # includes: same port, job.wait() across it returned completed, no worker exited


def test_result_write_failures_are_retried_not_lost(dsn: str) -> None:
    result = drills.drill_result_write_failures(drills.Setup(dsn, SMALL, WORKERS), fault_s=3.0)
    assert_drill_passed(result)
    assert result.bound > 0  # rows whose write was refused were called again
    assert result.check.duplicates == result.bound


def test_poison_rows_fail_at_once_with_the_reason(dsn: str) -> None:
    result = drills.drill_poison_rows(drills.Setup(dsn, SMALL, WORKERS), every=50)
    assert_drill_passed(result)
    assert result.check.failed == len(range(0, SMALL, 50))
    assert result.check.succeeded == SMALL - result.check.failed


def test_connection_resets(dsn: str) -> None:
    result = drills.drill_connection_resets(drills.Setup(dsn, SMALL, WORKERS), rate=0.05)
    assert_drill_passed(result)
    assert result.check.duplicates == 0
    assert ": 0 resets" not in result.note


def test_provider_outage_spends_no_attempts_and_the_job_finishes_by_itself(dsn: str) -> None:
    """bench/drills.py's 10-minute outage, shortened: 15 s of 503s, then 15 s of connection refused."""
    result = drills.drill_outage(drills.Setup(dsn, ROWS, WORKERS, outage_s=30.0), max_backoff=5.0)
    assert_drill_passed(result)  # includes: job running and waiting at the outage's end, completed by itself
    assert result.figures["dead"] == 0
    assert result.figures["attempts_per_row"] <= 1.02
    assert result.figures["events"] == 1  # job.provider_unavailable, once
    assert result.figures["circuits_opened"] >= 1
    assert result.figures["resumed_s"] >= 0


def counted(note: str, what: str) -> int:
    """The number before `what` in a drill's note ("simulator: 812 outage, ..."), 0 when absent."""
    found = re.search(rf"(\d+) {what}", note)
    return int(found.group(1)) if found else 0


def test_429_storm_is_ridden_out(dsn: str) -> None:
    result = drills.drill_429_storm(drills.Setup(dsn, SMALL, WORKERS), storm_s=5.0)
    assert_drill_passed(result)
    assert counted(result.note, "rate_limited") > 0, result.note  # the storm produced 429s


def test_slow_responses_time_out_and_are_retried(dsn: str) -> None:
    result = drills.drill_slow_responses(drills.Setup(dsn, SMALL, WORKERS), slow_s=4.0, timeout_s=1.0)
    assert_drill_passed(result)
    assert result.bound > 0  # calls were started during the slow spell and timed out


def test_disk_full_result_writes_are_retried_not_lost(dsn: str) -> None:
    result = drills.drill_result_write_failures(drills.Setup(dsn, SMALL, WORKERS), sqlstate="53100", fault_s=3.0)
    assert_drill_passed(result)
    assert counted(result.note, "refusals") > 0, result.note  # the trigger refused writes with 53100


def test_skewed_worker_clocks_do_not_move_leases(dsn: str) -> None:
    if drills.faketime_library() is None:
        pytest.skip("libfaketime is not installed (apt-get install -y libfaketime; .ci/run installs it)")
    result = drills.drill_clock_skew(drills.Setup(dsn, SMALL, WORKERS))
    assert_drill_passed(result)  # includes: no lease beyond database time + lease, no row claimed twice
    # The skew was real: each worker process's own time.time()/datetime.now() was an hour off.
    assert len(result.clock_offsets) == WORKERS
    ahead, behind = result.clock_offsets
    assert ahead is not None and abs(ahead - drills.CLOCK_SKEW_S) < 120, result.clock_offsets
    assert behind is not None and abs(behind + drills.CLOCK_SKEW_S) < 120, result.clock_offsets
