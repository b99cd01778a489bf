"""What the verbs hand a person: JSON on stdout, progress on stderr, links to stored objects."""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from typing import Any


def emit(payload: Any) -> None:
    print(json.dumps(payload, default=str))


@contextmanager
def progress_bar(total: int | None, desc: str):  # noqa: ANN201
    """A progress bar on stderr for interactive terminals; silent in pipes and CI logs."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        yield bar.update


def cmd_link(args: argparse.Namespace) -> int:
    from protein.links import MAX_LINK_S, shareable_url

    # NaN and infinity cannot become the whole seconds the store takes; a finite value out of range
    # is the link's own check to refuse, in the seconds it counts.
    if not math.isfinite(args.hours):
        raise ValueError(f"--hours expects a finite number of hours (at most {MAX_LINK_S // 3600}, 7 days), "
                         f"got {args.hours}")
    print(shareable_url(args.uri, expires_s=int(args.hours * 3600)))
    return 0
