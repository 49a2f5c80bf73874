"""The benchmarks' verdicts: a MISS, OVER or NOT SERVED line makes `python -m bench.fairshare` and
`python -m bench.ratelimit` exit 1 (as bench.drills does), so a script or CI cannot read a miss as a pass."""

from __future__ import annotations

import dataclasses

from bench import fairshare, ratelimit


def share_result(alice: float, *, served: bool = True) -> fairshare.Result:
    return fairshare.Result(
        "weighted",
        {"alice": (alice, 600), "bob": (1 - alice, 300)},
        {"alice": 2 / 3, "bob": 1 / 3},
        1.0 if served else None,
        3.0 if served else None,
        20.0,
        0,
    )


def test_fairshare_reports_a_share_off_its_weight_and_an_unserved_newcomer() -> None:
    assert fairshare.report([share_result(0.68)])[1] == []
    rows, missed = fairshare.report([share_result(0.75)])
    assert [r[-1] for r in rows[:2]] == ["MISS", "MISS"] and len(missed) == 2
    rows, missed = fairshare.report([share_result(0.68, served=False)])
    assert rows[-1][3] == "NOT SERVED" and missed == ["weighted: the newcomer's 10 rows were NOT SERVED"]


def figures(label: str, **changes: object) -> ratelimit.Figures:
    usage = ratelimit.Usage(
        processes=4, cpu_seconds=10.0, peak_rss=[100 << 20], shutdown_seconds=1.0, machine_busy_pct=50.0, logs=[]
    )
    good = ratelimit.Figures(
        label,
        4,
        16,
        rows_done=10_000,
        requests=10_050,
        rate_limited=10,
        utilisation_requests=0.5,
        utilisation_tokens=0.98,
        ramp_seconds=6.0,
        late_use=0.98,
        first_call=0,
        max_window_requests=2000,
        max_window_tokens=299_000,
        usage=usage,
    )
    return dataclasses.replace(good, **changes)


def test_ratelimit_reports_batchdb_misses_and_any_run_over_a_limit() -> None:
    scenario = ratelimit.Scenario(3000, 300_000, 200, (0.2, 2.0), 300, 15, 140.0, 3.0)
    assert scenario.binding == "TPM"
    assert ratelimit.misses([figures("batchdb x4")], scenario, batchdb_runs=1) == []
    slow = figures("batchdb x4", utilisation_tokens=0.90, ramp_seconds=None)
    assert ratelimit.misses([slow], scenario, batchdb_runs=1) == [
        "batchdb x4: MISS TPM use 90.0%",
        "batchdb x4: MISS time to 90% None",
    ]
    # A baseline may miss the targets (it is there to show that) but never go over a limit.
    baseline = figures("naive x4", utilisation_tokens=0.5, rate_limited=3000)
    assert ratelimit.misses([figures("batchdb x4"), baseline], scenario, batchdb_runs=1) == []
    over = figures("naive x4", max_window_tokens=300_001)
    assert ratelimit.misses([figures("batchdb x4"), over], scenario, batchdb_runs=1) == [
        "naive x4: a 60-s window OVER the limits"
    ]
