"""The champion's data never goes backwards: a challenger trained on data older (in a channel's push
order) than the champion's is not promoted unless a person says so.

Without this, a retrain of an old dataset (a manual run naming an old URI, a queued run that
took an older push) could win the gate on its own rows and replace a champion that had already
seen newer data. Pure: the push order comes in as numbers, the decision as the gate's dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DataOrder:
    """Where challenger's and champion's data stand on one channel (None: never pushed there)."""

    channel: str
    challenger_sequence: int | None
    champion_sequence: int | None
    allow_older: bool = False  # a person's flag: promote even if the data is older
    allowed_by: str | None = None  # who set it (the flow run), recorded with the promotion

    @property
    def backwards(self) -> bool:
        return (self.challenger_sequence is not None and self.champion_sequence is not None
                and self.challenger_sequence < self.champion_sequence)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "backwards": self.backwards}


def judge_data_order(decision: dict[str, Any], order: DataOrder) -> dict[str, Any]:
    """The gate's decision with the data-order rule applied and recorded (``data_order``): a
    promotion onto older data becomes a refusal with the reason, unless ``allow_older`` is set,
    in which case it stands and the reason names who allowed it."""
    judged = {**decision, "reasons": list(decision["reasons"]), "data_order": order.to_dict()}
    if not order.backwards:
        return judged
    where = (f"the challenger's data is push #{order.challenger_sequence} on channel {order.channel!r}, older than "
             f"the champion's push #{order.champion_sequence}")
    if order.allow_older:
        judged["reasons"].append(f"{where}; allowed by {order.allowed_by or 'a person'} (allow_older_data)")
    elif judged["promote"]:
        judged["promote"] = False
        judged["reasons"].append(f"{where}: the champion's data never goes backwards, so the champion stays "
                                 "(retrain with allow_older_data to promote it anyway)")
    else:
        judged["reasons"].append(where)
    return judged
