"""The soak's calendar keeps its promises for any seed, so a SOAK_SEED a user picks to reproduce or
vary a month draws a calendar the soak's assertions hold for (tests/integration/soak_calendar.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.integration.soak_calendar import FAULTS, KINDS, Plan, make_plan

SEEDS = range(60)


def broken_promises(plan: Plan) -> list[str]:
    pushes = plan.pushes
    kinds = [p.kind for p in pushes]
    problems = []
    if [p.index for p in pushes] != list(range(1, len(KINDS) + 1)) or Counter(kinds) != Counter(KINDS):
        problems.append(f"pushes {[p.describe() for p in pushes]} are not the {len(KINDS)} kinds {KINDS} in order")
    if kinds[0] != "new" or kinds[-1] != "new":
        problems.append("the first and last pushes must be new data")
    for i, push in enumerate(pushes):
        before = pushes[i - 1] if i else None
        after = pushes[i + 1] if i + 1 < len(pushes) else None
        if push.kind == "same" and (before is None or before.kind != "new"):
            problems.append(f"push {push.describe()} repeats something other than new data")
        if push.kind == "invalid" and (after is None or after.kind != "new" or after.during):
            problems.append(f"push {push.describe()} is not followed by new data on a night of its own")
        if push.during and (before is None or push.night != before.night):
            problems.append(f"push {push.describe()} arrives during a retrain of another night")
        if not push.during and before is not None and push.night <= before.night:
            problems.append(f"push {push.describe()} shares night {push.night} without arriving during a retrain")
        # A push followed by another during the same retrain is superseded (coalesced): it trains nothing.
        superseded = push.during and after is not None and after.during
        if push.fault and (push.kind in ("same", "invalid") or superseded):
            problems.append(f"push {push.describe()} carries a fault but trains nothing")
    if not all(1 <= p.night <= plan.nights - 2 for p in pushes):
        problems.append(f"push nights {[p.night for p in pushes]} outside 1..{plan.nights - 2}")
    if sum(p.during for p in pushes) < 2:
        problems.append("fewer than two pushes arrive during a retrain")
    if Counter(p.fault for p in pushes if p.fault) != Counter(FAULTS):
        problems.append(f"faults {[p.fault for p in pushes]} are not {FAULTS}")
    if plan.s3_outage_night in {p.night for p in pushes} or not 1 <= plan.s3_outage_night < plan.nights:
        problems.append(f"S3 goes down on night {plan.s3_outage_night}, not a quiet night of the month")
    return problems


@pytest.mark.parametrize("nights", [30, 90])
def test_every_seed_draws_a_calendar_that_keeps_its_promises(nights: int) -> None:
    broken = {seed: problems for seed in SEEDS if (problems := broken_promises(make_plan(seed, nights)))}
    assert not broken, broken


def test_a_seed_draws_the_same_calendar_every_time() -> None:
    assert make_plan(21, 30) == make_plan(21, 30)
    assert len({make_plan(seed, 30) for seed in range(10)}) == 10
