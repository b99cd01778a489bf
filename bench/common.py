"""Helpers shared by the benchmarks: timing with medians, machine info, atomic JSON results,
tables, and benchmark datasets made once and reused by later runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from protein.atomic import write_text_atomic

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
# Under the Makefile's WORK folder, which git ignores; override with BENCH_DATA_DIR.
DEFAULT_DATA_DIR = REPO / "work" / "bench-data"


def data_dir() -> Path:
    return Path(os.environ.get("BENCH_DATA_DIR", DEFAULT_DATA_DIR))


def results_path(name: str, quick: bool = False) -> Path:
    """bench/results/<name>.json; quick runs write <name>.quick.json so they never replace full numbers."""
    return RESULTS_DIR / (f"{name}.quick.json" if quick else f"{name}.json")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    write_text_atomic(Path(path), json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return Path(path)


def publish(name: str, result: dict[str, Any], table_text: str, out: Path | None = None,
            quick: bool = False) -> Path:
    """Write a benchmark's JSON (atomically) and print its table."""
    path = write_json(out or results_path(name, quick), result)
    print(table_text)
    print(f"wrote {path}")
    return path


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        # Other work on a shared machine skews timings; a high load average says to distrust them.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> list[float]:
    """Wall seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    # Numbers right-aligned, text left-aligned.
    lines += ["  ".join(v.rjust(w) if isinstance(row.get(c), int | float) else v.ljust(w)
                        for v, w, c in zip(r, widths, columns, strict=True))
              for r, row in zip(cells, rows, strict=True)]
    return "\n".join(lines)


def bench_dataset(n_train: int, size: int, seed: int = 0, root: Path | None = None) -> Path:
    """A competition-layout dataset of n_train synthetic size x size PNGs, made once under
    <data dir>/synth-<n>-<size>px-seed<seed> and reused while it is complete. If protein.synth
    cannot make it, noise PNGs are written to noise-<n>-<size>px-seed<seed> instead."""
    root = Path(root) if root is not None else data_dir()
    name = f"{n_train}-{size}px-seed{seed}"
    synth, noise = root / f"synth-{name}", root / f"noise-{name}"
    for out in (synth, noise):
        if _complete(out, n_train):
            return out
    truth = root / f"synth-{name}-test-labels.csv"
    shutil.rmtree(synth, ignore_errors=True)  # incomplete: left by a killed run
    truth.unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        from protein.config import SynthConfig
        from protein.synth import generate_dataset

        workers = max(1, min(8, os.cpu_count() or 1))
        generate_dataset(SynthConfig(train=n_train, test=1, size=size, seed=seed, workers=workers), out=synth,
                         truth=truth)
        out = synth
    except Exception as exc:  # the generator is still being written; any PNGs exercise the same decode
        log.warning("protein.synth could not write %s (%s: %s); writing noise PNGs instead",
                    synth, type(exc).__name__, exc)
        shutil.rmtree(synth, ignore_errors=True)
        _write_noise_dataset(noise, n_train, size, seed)
        out = noise
    log.info("benchmark dataset %s written in %.1fs", out, time.perf_counter() - started)
    return out


def _complete(out: Path, n_train: int) -> bool:
    train = out / "train"
    return (out / "train.csv").is_file() and train.is_dir() and sum(1 for _ in train.iterdir()) == n_train


def _write_noise_dataset(out: Path, n_train: int, size: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "test").mkdir()
    rng = np.random.default_rng(seed)
    ids = [str(i) for i in range(n_train)]
    (tmp / "train.csv").write_text("Image,Label\n" + "".join(f"{i},{int(i) % 10}\n" for i in ids))
    (tmp / "sample_submission.csv").write_text("Image,Label\nt0,0\n")
    for image_id in [*ids, "t0"]:
        folder = "test" if image_id.startswith("t") else "train"
        # Low-amplitude noise: compresses roughly like the dark microscopy images.
        pixels = (rng.random((size, size, 3)) * 48).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(tmp / folder / f"{image_id}.png")
    tmp.rename(out)


def run_in_checkout(code: Path, timer: str, args: Sequence[str], env: dict[str, str] | None = None) -> Any:
    """``python -c timer *args`` with ``code`` (a checkout: this one or a baseline's) first on the
    path; what it printed last, as JSON. The side-by-side benchmarks run each side this way."""
    done = subprocess.run([sys.executable, "-c", timer, *args], cwd=code, check=True, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(code), **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def git_head(code: Path) -> str:
    """The short commit a checkout is at, for a results file, with ``-dirty`` when a tracked file
    differs from it: a run with uncommitted changes measured code that no commit holds."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True,
                            check=True).stdout.strip()
    # Exit 1: tracked files differ from HEAD (untracked files are not the code that was measured).
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=code, capture_output=True).returncode
    if changed not in (0, 1):
        raise RuntimeError(f"git diff --quiet HEAD in {code} exited {changed}")
    return f"{commit}-dirty" if changed else commit


def process_cpu_s(code: str, *args: str) -> float:
    """User + system CPU seconds of one fresh interpreter running ``code`` (argv: ``args``) to its exit."""
    # stderr to a file, not a pipe: nobody reads a pipe before wait4, and a child's warnings could fill it.
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{code!r} exited {process.returncode}: {stderr.read().decode()[-2000:]}")
    return usage.ru_utime + usage.ru_stime


def process_cpu_versus_baseline(kinds: dict[str, str], baseline_start: str, rounds: int,
                                args: Sequence[str] = ()) -> list[dict[str, Any]]:
    """For each kind of process (its code), the CPU seconds of ``rounds`` fresh interpreters as
    shipped (`ours`) and with ``baseline_start`` run first (`baseline`), the two alternating round
    by round so a loaded machine's drift hits both alike; medians, and every sample."""
    rows = []
    for kind, code in kinds.items():
        ours: list[float] = []
        baseline: list[float] = []
        for i in range(rounds):
            pair = [("ours", code), ("baseline", baseline_start + code)]
            for label, source in pair if i % 2 == 0 else pair[::-1]:
                (ours if label == "ours" else baseline).append(process_cpu_s(source, *args))
        rows.append({"process": kind, "baseline CPU-s": median(baseline), "ours CPU-s": median(ours),
                     "saved CPU-s": median(baseline) - median(ours), "ratio": median(ours) / median(baseline),
                     "baseline samples": baseline, "ours samples": ours})
        print(f"{kind}: baseline {median(baseline):.2f} s, ours {median(ours):.2f} s", flush=True)
    return rows


def publish_process_cpu(name: str, rows: list[dict[str, Any]], rounds: int, quick: bool) -> dict[str, Any]:
    """process_cpu_versus_baseline's rows as the benchmark's results file and table."""
    result = {"benchmark": name, "rounds": rounds, "machine": machine_info(), "rows": rows}
    publish(name, result, format_table(rows, ["process", "baseline CPU-s", "ours CPU-s", "saved CPU-s", "ratio"]),
            quick=quick)
    return result


def parse_rounds(argv: list[str] | None, prog: str, description: str, quick_rounds: int) -> tuple[int, bool]:
    """A process bench's command line: `--rounds N` (default 5) or `--quick` (quick_rounds);
    the rounds, and whether quick."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help=f"{quick_rounds} round(s)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    return (quick_rounds if args.quick else args.rounds), args.quick
