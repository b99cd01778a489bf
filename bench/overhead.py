"""Orchestration overhead: the `retrain` flow vs the same library calls without Prefect.

    python -m bench.overhead [--repeats N] [--quick]

Both paths run in this process on the same tiny dataset, alternating, each with a fresh store
(so each run validates, trains, evaluates, gates, promotes and predicts). The Prefect API is a
local temporary server started once before timing (its start-up is reported separately): the
figure is what Prefect adds to a retrain once a server is running. Medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import bench_dataset, format_table, machine_info, median, results_path, write_json

IMAGE_SIZE = 64
TRAIN = {"epochs": 1, "image_size": 32, "batch_size": 16}


def plain_retrain(data: str, store: str, cache: Path) -> dict[str, Any]:
    """The retrain flow's steps as plain library calls, in the same order."""
    from protein.config import GateConfig, TrainConfig
    from protein.evaluation.gate import decide
    from protein.pipeline import (
        evaluate_for_gate,
        predict_and_publish,
        publish_training_plot,
        record_gate_decision,
        train_and_register,
    )
    from protein.registry import Registry
    from protein.storage import open_store
    from protein.validation import ValidationConfig, run_validation

    report = run_validation(data, ValidationConfig(image_size=IMAGE_SIZE), store_uri=store)
    assert report.success, report.summary_lines()
    registry = Registry(open_store(store))
    champion = registry.champion().champion
    config = TrainConfig(**TRAIN)
    challenger = train_and_register(data, store, config, cache_dir=cache)["model_id"]
    evaluation = evaluate_for_gate(data, store, challenger, champion, cache)
    challenger_eval, champion_eval = evaluation["challenger"], evaluation["champion"]
    decision = decide(challenger_eval, champion_eval, GateConfig(min_score=0.0)).to_dict()
    record_gate_decision(store, challenger, champion, decision, challenger_eval, champion_eval)
    publish_training_plot(store, challenger, challenger_eval, champion_eval)
    if decision["promote"]:
        registry.promote(challenger, expected_champion=champion)
        champion = challenger
    return predict_and_publish(data, store, champion, cache_dir=cache)


def flow_retrain(data: str, store: str) -> dict[str, Any]:
    from flows.params import GateParams, TrainParams, ValidationParams
    from flows.retrain import retrain

    state = retrain(data=data, store=store, train=TrainParams(**TRAIN), gate_config=GateParams(min_score=0.0),
                    validation=ValidationParams(image_size=IMAGE_SIZE), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    for name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "GX_ANALYTICS_ENABLED"):
        os.environ.setdefault(name, "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    data = str(bench_dataset(48, IMAGE_SIZE))
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cache = work / "cache"
    # Warm-up outside the timing: imports (torch, GX), the decoded-image cache.
    plain_retrain(data, str(work / "warmup"), cache)

    from prefect.testing.utilities import prefect_test_harness

    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=60):
        server_start_s = time.perf_counter() - started
        os.environ["PROTEIN_CACHE_DIR"] = str(cache)  # the flow's tasks use the same warm cache
        flow_retrain(data, str(work / "flow-warmup"))
        flow_s, plain_s = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            plain_retrain(data, str(work / f"plain-{i}"), cache)
            plain_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            flow_retrain(data, str(work / f"flow-{i}"))
            flow_s.append(time.perf_counter() - t0)

    result = {
        "flow_s": median(flow_s),
        "plain_s": median(plain_s),
        "ratio": median(flow_s) / median(plain_s),
        "added_s": median(flow_s) - median(plain_s),
        "flow_samples_s": flow_s,
        "plain_samples_s": plain_s,
        "server_start_s": server_start_s,
        "repeats": repeats,
        "dataset": {"n_train": 48, "image_size": IMAGE_SIZE, "train": TRAIN},
        "machine": machine_info(),
    }
    rows = [{"path": "plain library calls", "median_s": result["plain_s"]},
            {"path": "retrain flow (Prefect)", "median_s": result["flow_s"]},
            {"path": "ratio flow/plain", "median_s": result["ratio"]},
            {"path": "added by Prefect (s)", "median_s": result["added_s"]},
            {"path": "temporary server start (s, once)", "median_s": server_start_s}]
    print(format_table(rows, ["path", "median_s"]))
    write_json(results_path("overhead", args.quick), result)
    return result


if __name__ == "__main__":
    main()
