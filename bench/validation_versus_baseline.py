"""Validation cost of this checkout against a baseline checkout, on the same datasets, side by side.

The issue's budget (#24): validating the full-size set costs no more than before its changes plus
15 %. The baseline is a git worktree of an older commit (`git worktree add --detach DIR REV`); each
repeat runs, alternately, one process per checkout (PYTHONPATH set to it, same interpreter and
packages) that validates every dataset once to warm up (the Great Expectations import, the page
cache) and then times `validate_dataset` (or, with --docs, `run_validation`: the CLI's and the
task's path) on each. Alternating spreads the load of a shared machine over both sides alike; the
ratio of medians is the figure, never the seconds alone. CPU seconds (the process and its pool
workers) are reported beside wall seconds: on a machine shared with other work they move less with
the load than wall time does.

    python -m bench.validation_versus_baseline --baseline /tmp/baseline \
        --dataset labels-only=/path/a --dataset synthetic=/path/b [--repeats 3] [--headers-only NAME]
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

# Runs inside each checkout: argv = image size, then name=path[=headers] for each dataset.
_TIMER = """
import json, logging, resource, shutil, sys, tempfile, time
from pathlib import Path
logging.disable(logging.WARNING)
from protein.validation import ValidationConfig, run_validation, validate_dataset

def validate(path, config, mode):
    if mode != "docs":
        return validate_dataset(path, config)
    out = Path(tempfile.mkdtemp(prefix="protein-bench-report-"))
    try:  # what the CLI and the validate-data task run: report.json and Data Docs, no store
        return run_validation(path, config, report_dir=out)
    finally:
        shutil.rmtree(out)

size = int(sys.argv[1])
out = {}
for spec in sys.argv[2:]:
    name, path, mode = spec.split("=")
    config = ValidationConfig(image_size=size, check_pixels=mode != "headers")
    validate(path, config, mode)  # warm-up
    cpu = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    started = time.perf_counter()
    report = validate(path, config, mode)
    seconds = time.perf_counter() - started
    # CPU seconds of this process and of the pool workers it waited for: less swayed than wall time
    # by what else the shared machine runs.
    cpu_s = sum(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime for before, after in zip(
        cpu, (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))))
    out[name] = {"seconds": seconds, "cpu_s": cpu_s, "images": report.statistics.get("images_checked"),
                 "timings_s": report.statistics.get("timings_s"), "success": report.success,
                 "warnings": len(report.warnings), "failures": len(report.failures)}
print(json.dumps(out))
"""


def run_side(code: Path, size: int, specs: list[str]) -> dict[str, Any]:
    return run_in_checkout(code, _TIMER, [str(size), *specs], {"GX_ANALYTICS_ENABLED": "false"})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.validation_versus_baseline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--dataset", action="append", required=True, metavar="NAME=PATH",
                        help="a dataset folder to validate (full decode); repeatable")
    parser.add_argument("--headers-only", action="append", default=[], metavar="NAME",
                        help="validate this dataset with check_pixels=False")
    parser.add_argument("--docs", action="append", default=[], metavar="NAME",
                        help="validate this dataset with run_validation (report.json and Data Docs, as the CLI "
                             "and the validate-data task do, no store) instead of validate_dataset")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="what the datasets are, for the results file")
    args = parser.parse_args(argv)
    def mode(name: str) -> str:
        return "headers" if name in args.headers_only else "docs" if name in args.docs else "pixels"

    specs = [f"{spec}={mode(spec.split('=')[0])}" for spec in args.dataset]
    modes = {"headers": "validate_dataset, headers only", "pixels": "validate_dataset, full decode",
             "docs": "run_validation (+ Data Docs), full decode"}
    sides = {"baseline": args.baseline.resolve(), "current": REPO}
    samples: dict[str, dict[str, list[dict]]] = {side: {} for side in sides}
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    for _ in range(args.repeats):
        for side, code in sides.items():
            for name, result in run_side(code, args.image_size, specs).items():
                samples[side].setdefault(name, []).append(result)
            load.append(os.getloadavg()[0])
    rows = []
    for name in samples["current"]:
        base = [s["seconds"] for s in samples["baseline"][name]]
        current = [s["seconds"] for s in samples["current"][name]]
        last = samples["current"][name][-1]
        base_cpu = [s["cpu_s"] for s in samples["baseline"][name]]
        current_cpu = [s["cpu_s"] for s in samples["current"][name]]
        rows.append({"dataset": name, "mode": modes[mode(name)],
                     "images": last["images"], "baseline_s": median(base), "current_s": median(current),
                     "ratio": median(current) / median(base), "baseline_samples": base, "current_samples": current,
                     "baseline_cpu_s": median(base_cpu), "current_cpu_s": median(current_cpu),
                     "cpu_ratio": median(current_cpu) / median(base_cpu), "baseline_cpu_samples": base_cpu,
                     "current_cpu_samples": current_cpu,
                     "current_timings_s": last["timings_s"], "current_warnings": last["warnings"],
                     "baseline_timings_s": samples["baseline"][name][-1]["timings_s"]})
    print(format_table(rows, ["dataset", "mode", "images", "baseline_s", "current_s", "ratio", "baseline_cpu_s",
                              "current_cpu_s", "cpu_ratio"]))
    payload = {
        "benchmark": "validation_versus_baseline",
        "description": __doc__.split("\n\n")[0],
        "baseline_commit": git_head(args.baseline), "current_commit": git_head(REPO),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "load_average_1m": {"min": min(load), "max": max(load), "samples": load},
        "repeats": args.repeats, "wall_s": time.perf_counter() - started, "note": args.note, "rows": rows,
    }
    path = write_json(results_path("validation_versus_baseline", False), payload)
    print(f"wrote {path}; load average (1 min) {min(load):.1f} to {max(load):.1f}")
    return {row["dataset"]: row["ratio"] for row in rows}


if __name__ == "__main__":
    main()
