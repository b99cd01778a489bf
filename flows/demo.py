"""What `make run` runs: the retrain flow, twice, on embedded defaults.

A local Prefect server for the duration of the demo (or the one PREFECT_API_URL names), a local
folder store, and a synthetic dataset generated on first use unless --data names one. The first
run promotes; the second retrains on the same data and shows the gate deciding against the
existing champion. Then the submission is scored against the synthetic hidden test labels,
beside a predict-the-prior baseline.

The console shows a few lines per step; everything Prefect and the library log (tracebacks
included) goes to WORK/demo.log, which the demo names when something fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from flows.cli import checked_params, run_with_prefect
from flows.params import GateParams, TrainParams, ValidationParams
from flows.retrain import retrain
from protein.config import SynthConfig
from protein.evaluation.scoring import score_submission
from protein.locations import CACHE_DIR_ENV
from protein.registry import Registry
from protein.storage import open_store

DEMO_SYNTH = SynthConfig(train=400, test=100, size=512, seed=7, label_noise=0.03, workers=os.cpu_count() or 1)
DEMO_TRAIN = TrainParams(arch="resnet18", epochs=8, image_size=128, batch_size=32)
COMMAND = "make run"


def say(line: str) -> None:
    # Not print(): inside a flow run with log_prints, Prefect turns print() into a log record,
    # which StageLines would print again.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class StageLines(logging.Handler):
    """Prefect's flow and task run records, reduced to one short console line each.

    Prefect's own console handler prints every record with timestamps and run names; for a
    first contact that is pages of framework noise. The full records still reach the Prefect
    API (the UI) and WORK/demo.log."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        task = getattr(record, "task_name", None)
        if message.startswith("Beginning flow run") or message.startswith("Concurrency limits"):
            return  # the run header says which run; the gpu limit only exists on a production server
        if message.startswith("Finished in state"):
            state = message.removeprefix("Finished in state ").split("(")[0]
            say(f"  {task or 'retrain'}: {state.lower()}" if task else f"  run {state.lower()}")
        elif record.levelno >= logging.WARNING:
            say(f"  {task or 'retrain'}: {record.levelname.lower()}: {message.splitlines()[0]}")
        else:
            say(f"  {task + ': ' if task else ''}{message.splitlines()[0]}")


def configure_logging(log_file: Path) -> None:
    """Full logs to a file, short stage lines to the console.

    Call after Prefect set up its logging (importing `prefect.flow` does), which replaces the
    handlers of its loggers."""
    from prefect.logging.handlers import PrefectConsoleHandler

    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for handler in root.handlers:  # Prefect's console lines; the API handler (the UI) is left alone
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.CRITICAL + 1)
    root.addHandler(to_file)
    stages = StageLines(level=logging.INFO)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addHandler(stages)
    logging.getLogger("protein").setLevel(logging.INFO)
    for noisy in ("httpx", "great_expectations", "botocore", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def ensure_dataset(work: Path) -> tuple[Path, Path | None]:
    from protein.cli import progress_bar
    from protein.synth import generate_dataset

    dataset = work / "data" / "synthetic"
    truth = work / "data" / "synthetic-test-labels.csv"
    total = DEMO_SYNTH.train + DEMO_SYNTH.test
    if (dataset / "train.csv").exists():
        say(f"[1/4] synthetic dataset: reusing {dataset}")
    else:
        say(f"[1/4] synthetic dataset: generating {total} images ({DEMO_SYNTH.size} px) into {dataset}")
        started = time.monotonic()
        with progress_bar(total, "  synth") as update:
            generate_dataset(DEMO_SYNTH, dataset, truth, update)
        say(f"  done in {time.monotonic() - started:.0f} s")
    return dataset, truth if truth.exists() else None


def demo_train_params(epochs: int, image_size: int) -> TrainParams:
    """DEMO_TRAIN with the options' values, validated (model_copy does not validate: `--epochs 0`
    started a server and failed the run, exit 1)."""
    train = TrainParams(**{**DEMO_TRAIN.model_dump(), "epochs": epochs, "image_size": image_size})
    train.checked_config()  # the bounds across fields, as python -m flows.retrain checks them
    return train


def run_demo(args: argparse.Namespace, train: TrainParams, work: Path, dataset: Path, truth: Path | None) -> int:
    store = args.store or str(work / "store")
    results: list[dict[str, Any]] = []
    for attempt in (1, 2):
        say(f"[{attempt + 2}/4] retrain run {attempt}: validate -> train {train.arch} {train.epochs} epochs at "
            f"{train.image_size} px -> gate -> predict")
        started = time.monotonic()
        state = retrain(data=str(dataset), store=store, train=train, gate_config=GateParams(),
                        validation=ValidationParams(), return_state=True)
        if not state.is_completed():
            print(f"{COMMAND}: retrain run {attempt} failed: {state.message} (full log: {args.log})", file=sys.stderr)
            return 1
        result = state.result()
        results.append(result)
        say(f"  -> challenger {result['challenger']}: {'PROMOTED' if result['promoted'] else 'not promoted'} "
            f"({time.monotonic() - started:.0f} s)")
        for reason in result["reasons"]:
            say(f"     - {reason}")

    (work / "last_run.json").write_text(json.dumps(show_result(store, results, dataset, truth), indent=2, default=str))
    return 0


def show_result(store: str, results: list[dict[str, Any]], dataset: Path, truth: Path | None) -> dict[str, Any]:
    """The console's result of both runs, and what last_run.json keeps of them."""
    final = results[-1]
    summary: dict[str, Any] = {"runs": results}
    if final["champion"] is None:  # both runs completed and the gate refused both challengers: nothing serves
        say("\n=== result ===")
        say(f"no champion: the gate refused both challengers ({'; '.join(final['reasons'])}), so no submission was "
            "written; more --epochs train a model that can clear it")
        return summary
    spec = Registry(open_store(store)).spec(final["champion"])
    say("\n=== result ===")
    say(f"champion:    {final['champion']}")
    say(f"gate (run 2): {'promoted' if final['promoted'] else 'kept the champion'}")
    say(f"checkpoint:  {store}/runs/{spec['run_id']}/checkpoint.pt")
    say(f"model:       {store}/models/{final['champion']}/model.safetensors")
    say(f"submission:  {final['submission']}")
    if truth is not None and not store.startswith("s3://"):
        submission = Path(final["submission"].removeprefix("file://"))
        scores = score_submission(submission, truth, Path(dataset) / "train.csv")
        model, prior = scores["model"], scores["prior_baseline"]
        say("\nhidden synthetic test labels (f1_samples / f1_macro / course F-score):")
        say(f"  model:          {model['f1_samples']:.4f} / {model['f1_macro']:.4f} / {model['course_f_score']:.4f}")
        say(f"  prior baseline: {prior['f1_samples']:.4f} / {prior['f1_macro']:.4f} / {prior['course_f_score']:.4f}")
        keys = ("f1_samples", "f1_macro", "course_f_score")
        summary["test_scores"] = {"model": {k: model[k] for k in keys}, "prior_baseline": {k: prior[k] for k in keys}}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work"), help="git-ignored working folder")
    parser.add_argument("--data", type=Path, help="dataset folder or zip (default: a synthetic one in WORK/data)")
    parser.add_argument("--store", help="object store (default: WORK/store)")
    parser.add_argument("--epochs", type=int, default=DEMO_TRAIN.epochs)
    parser.add_argument("--image-size", type=int, default=DEMO_TRAIN.image_size)
    args = parser.parse_args(argv)
    train = checked_params("python -m flows.demo", lambda: demo_train_params(args.epochs, args.image_size))
    if isinstance(train, int):  # refused in one line before anything is written or started
        return train
    work = args.work.resolve()
    args.log = work / "demo.log"
    # The demo keeps everything it makes under WORK, so `make clean` removes all of it: its own cache
    # (not a PROTEIN_CACHE_DIR of the shell's) and its own Prefect server (not PREFECT_API_URL's) on its
    # own database (not the shell's PREFECT_HOME, which may be a production server's SQLite).
    os.environ[CACHE_DIR_ENV] = str(work / "cache")
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    configure_logging(args.log)
    started = time.monotonic()
    if args.data:
        dataset, truth = args.data, None
        say(f"[1/4] dataset: {dataset}")
    else:
        dataset, truth = ensure_dataset(work)
    code = run_with_prefect(COMMAND, lambda: run_demo(args, train, work, dataset, truth),
                            announce=lambda line: say(f"[2/4] Prefect: {line}"), local_only=True)
    if code == 0:
        say(f"\ndone in {time.monotonic() - started:.0f} s (full log: {args.log})")
    return code


if __name__ == "__main__":
    sys.exit(main())
