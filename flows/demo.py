"""What `make run` runs: the retrain flow, twice, on embedded defaults.

Local Prefect (a temporary API in this process unless PREFECT_API_URL is set), a local folder
store, and a synthetic dataset generated on first use unless --data names one. The first run
promotes; the second retrains on the same data and shows the gate deciding against the
existing champion. Then the submission is scored against the synthetic hidden test labels,
beside a predict-the-prior baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from flows.params import GateParams, TrainParams, ValidationParams
from flows.retrain import retrain
from protein.config import SynthConfig
from protein.registry import Registry
from protein.scoring import score_submission
from protein.storage import open_store
from protein.synth import generate_dataset

DEMO_SYNTH = SynthConfig(train=400, test=100, size=512, seed=7, label_noise=0.03, workers=os.cpu_count() or 1)
DEMO_TRAIN = TrainParams(epochs=8, image_size=128, batch_size=32)


def ensure_dataset(work: Path) -> tuple[Path, Path | None]:
    dataset = work / "data" / "synthetic"
    truth = work / "data" / "synthetic-test-labels.csv"
    if not (dataset / "train.csv").exists():
        print(f"generating a synthetic dataset in {dataset} ({DEMO_SYNTH.train} train, {DEMO_SYNTH.test} test)")
        generate_dataset(DEMO_SYNTH, dataset, truth)
    return dataset, truth if truth.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("work"), help="git-ignored working folder")
    parser.add_argument("--data", type=Path, help="dataset folder or zip (default: a synthetic one in WORK/data)")
    parser.add_argument("--store", help="object store (default: WORK/store)")
    parser.add_argument("--epochs", type=int, default=DEMO_TRAIN.epochs)
    parser.add_argument("--image-size", type=int, default=DEMO_TRAIN.image_size)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    work = args.work.resolve()
    if args.data:
        dataset, truth = args.data, None
    else:
        dataset, truth = ensure_dataset(work)
    store = args.store or str(work / "store")
    train = DEMO_TRAIN.model_copy(update={"epochs": args.epochs, "image_size": args.image_size})
    results = []
    for attempt in (1, 2):
        print(f"\n=== retrain run {attempt} ===")
        state = retrain(data=str(dataset), store=store, train=train, gate_config=GateParams(),
                        validation=ValidationParams(), return_state=True)
        if not state.is_completed():
            print(f"retrain failed: {state.message}", file=sys.stderr)
            return 1
        results.append(state.result())
        result = results[-1]
        print(f"challenger {result['challenger']}: {'PROMOTED' if result['promoted'] else 'not promoted'}")
        for reason in result["reasons"]:
            print(f"  - {reason}")

    final = results[-1]
    registry = Registry(open_store(store))
    spec = registry.spec(final["champion"])
    print("\n=== result ===")
    print(f"champion:    {final['champion']}")
    print(f"gate (run 2): {'promoted' if final['promoted'] else 'kept the champion'}")
    print(f"checkpoint:  {store}/runs/{spec['run_id']}/checkpoint.pt")
    print(f"model:       {store}/models/{final['champion']}/model.safetensors")
    print(f"submission:  {final['submission']}")
    if truth is not None and not store.startswith("s3://"):
        scores = score_submission(Path(final["submission"]), truth, Path(dataset) / "train.csv")
        model, prior = scores["model"], scores["prior_baseline"]
        print("\nhidden synthetic test labels (f1_samples / f1_macro / course F-score):")
        print(f"  model:          {model['f1_samples']:.4f} / {model['f1_macro']:.4f} / {model['course_f_score']:.4f}")
        print(f"  prior baseline: {prior['f1_samples']:.4f} / {prior['f1_macro']:.4f} / {prior['course_f_score']:.4f}")
        (work / "last_run.json").write_text(json.dumps({"runs": results, "test_scores": {
            "model": {k: model[k] for k in ("f1_samples", "f1_macro", "course_f_score")},
            "prior_baseline": {k: prior[k] for k in ("f1_samples", "f1_macro", "course_f_score")}}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
