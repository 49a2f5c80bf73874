"""The cost benchmark, small (bench/cost.py): the same rows with 30% exact duplicates, online, batch and
batch + dedupe, through a worker process and the simulator.

What it asserts holds at any size: batchdb's recorded cost equals the simulator's own bill to the
cent, batch costs half of online (the same prompts and output lengths at half the price), batch +
dedupe about 0.5 x 0.7 = 35% (the duplicates are never sent). `python -m bench.cost` runs 20,000 rows.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from batchdb import submission
from bench import cost

pytestmark = pytest.mark.timeout(300)  # a guard against a hang; it takes about 15 s


def test_the_dataset_has_exactly_the_share_of_exact_duplicates_asked_for() -> None:
    frame = cost.dataset(1_000, 0.3)
    assert len(frame) == 1_000 and frame["id"].is_unique
    assert int(frame["headline"].duplicated().sum()) == 300
    assert frame.equals(cost.dataset(1_000, 0.3))  # the same rows every time


@pytest.mark.slow
def test_batch_halves_the_bill_dedupe_takes_off_the_copies_and_batchdb_records_the_bill(dsn: str) -> None:
    # With auto mode in the build, its batches take 5 s: time enough for the online path to take the rows
    # the lane's full batch queue leaves it, however busy the machine.
    auto_lane = cost.AutoLane(batch_duration_s=5.0)
    runs = {r.label: r for r in cost.run_benchmark(dsn, 300, workers=1, concurrency=32, timeout=240, auto=auto_lane)}
    online, batch, deduped = runs["online"], runs["batch"], runs["batch + dedupe"]
    for run in (online, batch, deduped):
        assert run.problems == [], (run.label, run.problems)
        assert run.rows_answered == 300
        assert abs(run.recorded - run.bill) < Decimal("0.005"), run.label  # to the cent
        assert run.recorded - run.bill == run.rounding + run.wasted  # nothing else between them
    assert (online.online_calls, online.batch_lines, online.batches) == (300, 0, 0)
    assert (batch.online_calls, batch.batch_lines) == (0, 300) and batch.batches >= 1
    assert (deduped.batch_lines, deduped.duplicates) == (210, 90)
    assert batch.bill == online.bill / 2  # same tokens, every price halved
    assert deduped.bill / online.bill <= cost.TARGET_BATCH_DEDUPE
    rows, missed = cost.verdicts(list(runs.values()))
    assert missed == []
    auto = runs["auto"]
    if "auto" not in submission.JOB_MODES:
        assert not auto.available and rows[-1][2] == cost.NOT_AVAILABLE
    else:
        assert auto.problems == [] and auto.rows_answered == 300 and auto.agrees
        assert auto.online_calls > 0 and auto.batch_lines > 0  # part online, part batch
        assert auto.online_calls + auto.batch_lines == 210  # each distinct request sent once


def test_a_missed_target_or_a_bill_that_disagrees_is_reported() -> None:
    online = cost.Run("online", {}, bill=Decimal(10), recorded=Decimal(10))
    batch = cost.Run("batch", {}, bill=Decimal("5.5"), recorded=Decimal("5.5"))
    deduped = cost.Run("batch + dedupe", {}, bill=Decimal("3.5"), recorded=Decimal("3.52"))
    _, missed = cost.verdicts([online, batch, deduped])
    assert missed == [
        "batch: 55.00% of online, target 50%",
        "batch + dedupe: recorded 3.52 != bill 3.5",
    ]
