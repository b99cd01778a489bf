"""Cross-fitted threshold tuning (protein.evaluation.thresholds.cross_fit) in this checkout against a
baseline checkout, side by side on the same holdouts.

Every trained model tunes its thresholds on its holdout with `cross_fit`, and the gate scores
challenger and champion with it again (`cross_fitted_rows`): three tunings per retrain. Each side
runs in its own process, one after the other, `--repeats` times; the table gives medians of the
CPU seconds of one `cross_fit` per holdout size, and their ratio. The holdouts are synthetic
(seeded): ten classes, labels at the real set's rates rounded (0.2), scores that separate them
partly. Both sides' thresholds are compared: the ratio only counts if they are identical.

    python -m bench.thresholds_versus_baseline --baseline /tmp/baseline [--rows 4 40 400 3800] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.common import format_table, git_head, median, results_path, run_in_checkout, write_json

REPO = Path(__file__).resolve().parents[1]

# Runs inside each checkout: argv = holdout sizes; prints {rows: {cpu_s, thresholds}}.
_TIMER = """
import hashlib, json, sys, time
import numpy as np
from protein.evaluation.thresholds import cross_fit

out = {}
for n in map(int, sys.argv[1:]):
    rng = np.random.default_rng(n)
    targets = rng.random((n, 10)) < 0.2
    probs = np.clip(targets * 0.6 + rng.random((n, 10)) * 0.5, 0, 1)
    cross_fit(probs[:4], targets[:4])  # first calls (imports, numpy's caches) outside the timing
    started = time.process_time()
    tuned = cross_fit(probs, targets)
    cpu_s = time.process_time() - started
    digest = hashlib.sha256(tuned.row_thresholds.tobytes() + tuned.thresholds.tobytes()).hexdigest()
    out[n] = {"cpu_s": cpu_s, "thresholds_sha256": digest}
print(json.dumps(out))
"""


def run_side(code: Path, rows: list[int]) -> dict[str, Any]:
    return run_in_checkout(code, _TIMER, [str(n) for n in rows], {"OMP_NUM_THREADS": "1"})


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(prog="python -m bench.thresholds_versus_baseline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 40, 400, 3800], help="holdout sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sides = {"baseline": args.baseline.resolve(), "current": REPO}
    samples: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    for repeat in range(args.repeats):
        # Alternate which side goes first, so a drift of the machine's speed falls on both.
        for side in (list(sides) if repeat % 2 == 0 else list(reversed(sides))):
            samples[side].append(run_side(sides[side], args.rows))
            load.append(os.getloadavg()[0])
    rows = []
    for n in map(str, args.rows):
        base = [s[n]["cpu_s"] for s in samples["baseline"]]
        current = [s[n]["cpu_s"] for s in samples["current"]]
        same = {s[n]["thresholds_sha256"] for side in sides for s in samples[side]}
        rows.append({"rows": int(n), "baseline_cpu_s": median(base), "current_cpu_s": median(current),
                     "cpu_ratio": median(current) / median(base), "same_thresholds": len(same) == 1,
                     "baseline_samples": base, "current_samples": current})
    print(format_table(rows, ["rows", "baseline_cpu_s", "current_cpu_s", "cpu_ratio", "same_thresholds"]))
    payload = {
        "benchmark": "thresholds_versus_baseline", "description": __doc__.split("\n\n")[0],
        "baseline_commit": git_head(args.baseline), "current_commit": git_head(REPO),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "load_average_1m": {"min": min(load), "max": max(load), "samples": load},
        "repeats": args.repeats, "wall_s": time.perf_counter() - started, "rows": rows,
    }
    path = write_json(results_path("thresholds_versus_baseline", False), payload)
    print(f"wrote {path}; load average (1 min) {min(load):.1f} to {max(load):.1f}")
    different = [r["rows"] for r in rows if not r["same_thresholds"]]
    if different:
        raise SystemExit(f"the two sides chose different thresholds for holdouts of {different} rows")
    return {r["rows"]: r["cpu_ratio"] for r in rows}


if __name__ == "__main__":
    main()
