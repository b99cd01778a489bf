"""Run the CPU benchmarks one after another and print one summary table.

    python -m bench.run_all [--quick]      (`make bench` runs the full set)

data_path and train_speed always run; validation_bench and overhead run when their modules
exist (they are written separately), and gpu when a CUDA GPU is present. A benchmark that is
absent or fails is reported and skipped; the exit status is 1 only if a required one failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import format_table, machine_info, results_path, write_json

log = logging.getLogger(__name__)

REQUIRED = ("data_path", "train_speed")
OPTIONAL = ("validation_bench", "overhead")


def _call_main(module_name: str, argv: list[str]) -> Any:
    return importlib.import_module(f"bench.{module_name}").main(argv)


def _call_optional(module_name: str, quick: bool) -> Any:
    """Benchmarks written elsewhere: pass --quick when asked, and if their parser refuses it
    (argparse exits 2), run their default instead."""
    if quick:
        try:
            return _call_main(module_name, ["--quick"])
        except SystemExit as exc:
            if exc.code != 2:
                raise
            print(f"{module_name}: takes no --quick; running its default", flush=True)
    return _call_main(module_name, [])


def run_one(name: str, call: Callable[[], Any]) -> dict[str, Any]:
    print(f"\n=== {name} ===", flush=True)
    started = time.perf_counter()
    try:
        result = call()
        status = "ok"
    except SystemExit as exc:  # an argparse error or sys.exit inside a benchmark's main
        result, status = None, "ok" if exc.code in (0, None) else f"failed: exit {exc.code}"
    except Exception as exc:
        traceback.print_exc()
        result, status = None, f"failed: {type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    if status != "ok":
        print(f"{name}: {status}")
    return {"name": name, "status": status, "seconds": seconds, "result": result}


def summary_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for run in runs:
        name, result = run["name"], run["result"]
        if run["status"] != "ok" or not isinstance(result, dict):
            rows.append({"benchmark": name, "measure": run["status"], "value": None, "ratio": None})
            continue
        if name == "data_path":
            px = f"{result['n_images']} imgs {result['image_size']}px"
            rows += [
                {"benchmark": name, "measure": f"naive PNG decode images/s ({px}, {result['png_source']})",
                 "value": result["naive_images_per_s"], "ratio": 1.0},
                {"benchmark": name, "measure": "decode-once cache images/s",
                 "value": result["cache_images_per_s"], "ratio": result["ratio"]},
                {"benchmark": name, "measure": "cache build, one-off (s)", "value": result["cache_build_s"],
                 "ratio": None},
            ]
            if "synthetic_png" in result:
                synthetic = result["synthetic_png"]
                rows += [
                    {"benchmark": name, "measure": "naive PNG decode images/s (synthetic PNGs)",
                     "value": synthetic["naive_images_per_s"], "ratio": 1.0},
                    {"benchmark": name, "measure": "decode-once cache images/s (synthetic PNGs)",
                     "value": synthetic["cache_images_per_s"], "ratio": synthetic["ratio"]},
                ]
        elif name == "train_speed":
            for r in result["results"]:
                tag = f"{r['arch']} {r['image_size']}px b{r['batch_size']}"
                rows += [
                    {"benchmark": name, "measure": f"train images/s ({tag})", "value": r["train_images_per_s"],
                     "ratio": None},
                    {"benchmark": name, "measure": f"infer images/s ({tag})", "value": r["infer_images_per_s"],
                     "ratio": r["infer_images_per_s"] / r["train_images_per_s"]},
                ]
        elif name == "gpu":
            for r in result["results"]:
                tag = f"{r['arch']} {r['image_size']}px {'compiled' if r['compile'] else 'eager'} {r['loader']}"
                rows.append({"benchmark": name, "measure": f"train images/s ({tag})", "value": r["images_per_s"],
                             "ratio": r["ratio_to_ceiling"]})
        else:  # benchmarks written elsewhere: show their flat numbers
            numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            rows += [{"benchmark": name, "measure": k, "value": v, "ratio": None} for k, v in numbers.items()]
            if not numbers:
                rows.append({"benchmark": name, "measure": "ok (see its own output)", "value": None, "ratio": None})
    return rows


def busy_warning() -> float:
    """The 1-minute load average; warns when other work already occupies the CPUs."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        # Measured here: with both cores busy elsewhere, torch's two OpenMP threads wait on each
        # other and CPU timings slow down several-fold; medians soften this, they do not fix it.
        print(f"WARNING: load average {load:.1f} on {cpus} CPUs before starting: other work is running, "
              "CPU timings will be slow and noisy", flush=True)
    return load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast variants: a check that all run")
    args = parser.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    started = time.perf_counter()
    load_before = busy_warning()

    runs = [run_one(name, lambda name=name: _call_main(name, quick)) for name in REQUIRED]
    for name in OPTIONAL:
        if importlib.util.find_spec(f"bench.{name}") is None:
            print(f"\n=== {name} ===\n{name}: skipped (bench/{name}.py does not exist yet)")
            runs.append({"name": name, "status": "skipped: absent", "seconds": 0.0, "result": None})
            continue
        runs.append(run_one(name, lambda name=name: _call_optional(name, args.quick)))

    import torch

    if torch.cuda.is_available():
        runs.append(run_one("gpu", lambda: _call_main("gpu", quick)))
    else:
        print("\n=== gpu ===\ngpu: skipped (no CUDA GPU; `python -m bench.gpu --device cpu --quick` smoke-checks it)")
        runs.append({"name": "gpu", "status": "skipped: no CUDA", "seconds": 0.0, "result": None})

    rows = summary_rows(runs)
    machine = machine_info()
    machine["load_average_1m_before"] = load_before
    print(f"\n=== summary ({'quick' if args.quick else 'full'}; {machine['cpu_count']} CPUs, "
          f"torch {machine['torch']}, {machine.get('gpu', 'no GPU')}; {time.perf_counter() - started:.0f}s) ===")
    print(format_table(rows, ["benchmark", "measure", "value", "ratio"]))
    print("\n" + format_table([{"benchmark": r["name"], "status": r["status"], "seconds": r["seconds"]}
                               for r in runs], ["benchmark", "status", "seconds"]))
    write_json(results_path("run_all", args.quick), {
        "benchmark": "run_all",
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
        "runs": [{k: run[k] for k in ("name", "status", "seconds")} for run in runs],
        "summary": rows,
        "machine": machine,
    })
    failed = [r["name"] for r in runs if r["name"] in REQUIRED and r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
