"""The soak's calendar (tests/integration/test_soak.py), drawn from a seed: on which nights the 8
pushes arrive, what each holds (new data, the data before it again, data that fails validation),
which arrive while the previous push's retrain runs, which retrain a fault strikes, and the night
S3 goes down. Pure: tests/unit/test_soak_calendar.py checks its promises for many seeds."""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ["new"] * 6 + ["same", "invalid"]
FAULTS = ["sigkill", "sigkill", "restart", "api-restart"]


@dataclass(frozen=True)
class Push:
    index: int  # 1..8, in push order
    night: int
    kind: str  # new data, the same data as the push before, or data that fails validation
    during: bool  # pushed while the previous push's retrain runs (queued behind it)
    fault: str | None  # applied while this push's retrain trains on a GPU host

    def describe(self) -> str:
        return f"#{self.index} {self.kind}{' during' if self.during else ''}{' +' + self.fault if self.fault else ''}"


@dataclass(frozen=True)
class Plan:
    seed: int
    nights: int
    pushes: tuple[Push, ...]
    s3_outage_night: int


def make_plan(seed: int, nights: int) -> Plan:
    """A calendar drawn from the seed, redrawn until it has what the soak needs: the first and last
    pushes new data, the repeat right after the data it repeats, the invalid push followed by a new
    one, and four pushes whose retrain trains whatever is pushed next (for the four faults)."""
    rng = random.Random(seed)
    while True:
        kinds = KINDS[:]
        rng.shuffle(kinds)
        if kinds[0] != "new" or kinds[-1] != "new" or kinds[kinds.index("same") - 1] != "new" \
                or kinds[kinds.index("invalid") + 1] != "new":
            continue
        # A push after the invalid one is never "during": that run fails at validation in seconds.
        during = [i > 0 and kinds[i - 1] != "invalid" and rng.random() < 0.45 for i in range(len(kinds))]
        # "During" pushes arrive once the night's first retrain has taken its push: two of them in a
        # row queue together, and the first is superseded by the second (coalesced). A superseded
        # push trains nothing, so no fault goes there.
        # Nor on a repeat of the data before it: its run trains nothing (the champion has that data).
        eligible = [i for i in range(len(kinds)) if kinds[i] not in ("invalid", "same")
                    and not (during[i] and i + 1 < len(kinds) and during[i + 1])]
        if len(eligible) < len(FAULTS) or sum(during) < 2:
            continue
        faulted = dict(zip(rng.sample(eligible, len(FAULTS)), FAULTS, strict=True))
        starts = sorted(rng.sample(range(1, nights - 1), len(kinds) - sum(during)))
        night_of, chain = [], iter(starts)
        for i in range(len(kinds)):
            night_of.append(night_of[-1] if during[i] else next(chain))
        quiet = sorted(set(range(1, nights)) - set(night_of))
        pushes = tuple(Push(i + 1, night_of[i], kinds[i], during[i], faulted.get(i)) for i in range(len(kinds)))
        return Plan(seed, nights, pushes, rng.choice(quiet))
