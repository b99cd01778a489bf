"""Single-process parts of data-parallel training: sharding, the ragged batch, accumulation."""


import numpy as np
import pytest
import torch
from torch import nn

from protein.config import TrainConfig
from protein.labels import LABELS
from protein.modeling import distributed
from protein.modeling.presets import EvalPreset, normalization_constants
from protein.modeling.scaling import check_batch_split, steps_per_epoch
from protein.modeling.train import fit, iterate_batches, train_one_epoch
from protein.storage import open_store


def numbered(n: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(3, axis=3)
    return images, np.eye(n, dtype=np.float32)


def sizes(batches) -> list[int]:  # noqa: ANN001
    return [len(x) for x, _ in batches]


def test_training_drops_only_the_ragged_last_batch():
    images, targets = numbered(60)
    idx = np.arange(49)
    gen = torch.Generator().manual_seed(0)
    assert sizes(iterate_batches(images, targets, idx, 16, gen, drop_last=True)) == [16, 16, 16]
    assert sizes(iterate_batches(images, targets, idx, 16)) == [16, 16, 16, 1]  # evaluation keeps every row
    # Less than one batch: the one short batch is kept, not dropped to nothing.
    assert sizes(iterate_batches(images, targets, idx[:10], 16, drop_last=True)) == [10]
    assert steps_per_epoch(49, 16) == 3 and steps_per_epoch(10, 16) == 1


def test_ranks_read_disjoint_shards_of_the_same_global_batches():
    images, targets = numbered(60)
    idx = np.arange(3, 53)
    single = [sorted(x[:, 0, 0, 0].tolist()) for x, _ in
              iterate_batches(images, targets, idx, 8, torch.Generator().manual_seed(4), drop_last=True)]
    per_rank = [[x[:, 0, 0, 0].tolist() for x, _ in
                 iterate_batches(images, targets, idx, 8, torch.Generator().manual_seed(4), drop_last=True,
                                 rank=distributed.Rank(r, r, 2))] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single) == 6
    for whole, a, b in zip(single, *per_rank, strict=True):
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert sorted(a + b) == whole


def test_unshard_restores_the_order_of_any_split():
    rows = np.arange(11 * 2, dtype=np.float32).reshape(11, 2)
    for world in (1, 2, 3, 4):
        parts = [distributed.shard(rows, distributed.Rank(r, r, world)) for r in range(world)]
        longest = max(len(p) for p in parts)
        padded = [np.concatenate([p, np.full((longest - len(p), 2), -1, np.float32)]) for p in parts]
        assert np.array_equal(distributed.unshard(padded, len(rows)), rows)


def test_global_batch_must_split_evenly_over_ranks_and_accumulation():
    config = TrainConfig(batch_size=16, accumulate=2)
    assert check_batch_split(config, 2) == 4
    with pytest.raises(ValueError, match="multiple of nproc x accumulate = 3 x 2"):
        check_batch_split(config, 3)
    with pytest.raises(ValueError, match="accumulate"):
        TrainConfig(batch_size=16, accumulate=3)


def test_gradient_accumulation_matches_one_large_batch():
    def net() -> nn.Module:
        torch.manual_seed(0)  # no BatchNorm: micro-batches then see exactly the full batch's gradient
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    images = torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8)
    targets = (torch.rand(16, 5) > 0.5).float()
    batches = [(images[:8], targets[:8]), (images[8:], targets[8:])]
    weights, passes = [], {}
    for accumulate in (1, 4):
        model = net()
        # The size of each forward pass: with accumulate ignored, both runs are the same run and pass.
        seen: list[int] = []
        model.register_forward_pre_hook(lambda _module, args, seen=seen: seen.append(args[0].shape[0]))
        passes[accumulate] = seen
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        stats = train_one_epoch(model, iter(batches), optimizer, scheduler, nn.BCEWithLogitsLoss(),
                                lambda x, *_: EvalPreset()(x), torch.device("cpu"), accumulate=accumulate)
        weights.append([p.detach().clone() for p in model.parameters()])
        assert stats["train_images"] == 16
    assert not torch.allclose(weights[0][0], net()[0].weight)  # it trained
    assert passes == {1: [8, 8], 4: [2] * 8}, passes
    for a, b in zip(*weights, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_normalisation_constants_are_built_once_per_device():
    first = normalization_constants((0.1, 0.2, 0.3), (0.5, 0.5, 0.5), torch.device("cpu"))
    assert first is normalization_constants((0.1, 0.2, 0.3), (0.5, 0.5, 0.5), torch.device("cpu"))
    x = torch.randint(0, 255, (2, 4, 4, 3), dtype=torch.uint8)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5
    assert torch.allclose(EvalPreset(mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))(x), expected, atol=1e-5)


def test_fit_survives_a_last_batch_of_one_image(tmp_path):
    # 49 rows with batch 16 left a final batch of one image: BatchNorm raised
    # "Expected more than 1 value per channel when training".
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8)
    targets = (rng.random((60, len(LABELS))) > 0.8).astype(np.float32)
    config = TrainConfig(image_size=32, epochs=1, batch_size=16, device="cpu")
    result = fit(config, images, targets, np.arange(49), np.arange(49, 60), open_store(str(tmp_path / "store")), "r1")
    assert result.history[0]["train_images"] == 48
    assert result.extra["layout"]["steps_per_epoch"] == 3


def test_nproc_that_cannot_split_the_batch_is_a_usage_error_before_launching(tmp_path, capsys):
    from protein.cli import main

    code = main(["train", "--data", str(tmp_path / "absent"), "--store", str(tmp_path / "store"),
                 "--batch-size", "9", "--nproc", "2", "--device", "cpu"])
    assert code == 2
    assert "batch_size 9 (the global batch) must be a multiple of nproc x accumulate = 2 x 1" in capsys.readouterr().err


def test_a_rank_without_a_run_id_is_refused_before_touching_the_store(tmp_path, monkeypatch):
    from protein.pipeline import train_and_register

    # As torchrun would set it for rank 1 of 2, but launched without the run id the launcher passes.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "process_group", lambda device: __import__("contextlib").nullcontext())
    store = tmp_path / "store"
    with pytest.raises(ValueError, match="needs --run-id"):
        train_and_register(tmp_path / "no-data", str(store), TrainConfig(device="cpu"))
    assert not store.exists()


def test_rank_zeros_own_error_reaches_the_launcher_with_its_exit_code(tmp_path, monkeypatch, capsys):
    """A rank 0 that stops on one of the pipeline's errors (a superseded checkpoint: exit 10) hands
    it to the launcher, which exits with it: not exit 7's "a rank died, rerun", which a rerun while
    the other attempt lives would only repeat."""
    import json

    import protein.pipeline as pipeline
    from protein.cli import main
    from protein.errors import CheckpointSuperseded

    def superseded(*args, **kwargs):
        raise CheckpointSuperseded("runs/r/checkpoint.pt: another attempt of run r wrote the checkpoint")

    result_file = tmp_path / "result.json"
    monkeypatch.setenv(distributed.RESULT_FILE_ENV, str(result_file))
    monkeypatch.setattr(pipeline, "train_and_register", superseded)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"data": "d", "store": "s", "config": {"device": "cpu"}, "run_id": "r",
                               "cache_dir": None}))
    assert main(["train-job", str(job)]) == 10  # rank 0 (no RANK set) writes its error, then exits with it
    assert json.loads(result_file.read_text())["exit_code"] == 10
    assert json.loads(result_file.read_text())["type"] == "CheckpointSuperseded"

    # The launcher's side: torchrun failed, rank 0 said why.
    from protein.pipeline import training

    monkeypatch.setattr(training.distributed, "launch", lambda nproc, argv: (1, json.loads(result_file.read_text())))
    monkeypatch.setattr(training, "open_training_inputs",
                        lambda *args: type("Inputs", (), {"run_id": "r", "data": None, "data_fingerprint": "f"})())
    monkeypatch.setattr(training, "load_split_images", lambda *args, **kwargs: None)
    code = main(["train", "--data", str(tmp_path), "--store", str(tmp_path / "store"), "--nproc", "2",
                 "--batch-size", "8", "--device", "cpu", "--run-id", "r"])
    assert code == 10
    assert "another attempt of run r wrote the checkpoint" in capsys.readouterr().err


def test_launch_hands_back_rank_zeros_error_but_no_result_from_a_failed_run(monkeypatch):
    """torchrun failed: rank 0's own error comes back with it; a result rank 0 wrote before
    another rank died does not (the run failed)."""
    import json
    import subprocess

    def torchrun_that_writes(written, code):  # noqa: ANN001, ANN202
        def popen(command, env):  # noqa: ANN001, ANN202
            with open(env[distributed.RESULT_FILE_ENV], "w") as out:
                json.dump(written, out)
            return real_popen(["/bin/sh", "-c", f"exit {code}"])
        return popen

    real_popen = subprocess.Popen
    error = {"error": "runs/r/checkpoint.pt: superseded", "exit_code": 10}
    monkeypatch.setattr(distributed.subprocess, "Popen", torchrun_that_writes(error, 1))
    assert distributed.launch(2, ["train-job", "job.json"]) == (1, error)
    monkeypatch.setattr(distributed.subprocess, "Popen", torchrun_that_writes({"model_id": "m"}, 1))
    assert distributed.launch(2, ["train-job", "job.json"]) == (1, None)
    monkeypatch.setattr(distributed.subprocess, "Popen", torchrun_that_writes({"model_id": "m"}, 0))
    assert distributed.launch(2, ["train-job", "job.json"]) == (0, {"model_id": "m"})


def test_another_ranks_own_error_reaches_the_launcher_and_only_a_silent_death_is_a_dead_rank(
        tmp_path, monkeypatch):
    """Rank 1 out of memory stops the run as surely as rank 0: its error (exit 11) reaches the
    launcher, so the train task does not retry the same config twice as it retries a rank that
    died without a word (TrainingFailed, exit 7: killed, resumable)."""
    import json
    import subprocess

    from protein.errors import RankZeroError, TrainingFailed
    from tasks.retry import is_transient

    result_file = tmp_path / "result.json"
    monkeypatch.setenv(distributed.RESULT_FILE_ENV, str(result_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.write_error("run r ran out of memory on rank 1", 11)
    assert not result_file.exists()
    side = json.loads((tmp_path / "result.json.rank1").read_text())
    assert side == {"error": "run r ran out of memory on rank 1", "exit_code": 11, "rank": 1, "type": None}

    def torchrun(rank_files: dict[str, dict], code: int):  # noqa: ANN202
        def popen(command, env):  # noqa: ANN001, ANN202
            for suffix, written in rank_files.items():
                with open(env[distributed.RESULT_FILE_ENV] + suffix, "w") as out:
                    json.dump(written, out)
            return real_popen(["/bin/sh", "-c", f"exit {code}"])
        return popen

    real_popen = subprocess.Popen
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(distributed.subprocess, "Popen", torchrun({".rank3": {"error": "late", "exit_code": 2},
                                                                    ".rank1": side}, 1))
    assert distributed.launch(4, ["train-job", "job.json"]) == (1, side)  # the lowest rank's
    monkeypatch.setattr(distributed.subprocess, "Popen", torchrun({}, 1))
    assert distributed.launch(2, ["train-job", "job.json"]) == (1, None)  # a rank killed: nothing said
    assert not is_transient(RankZeroError(side["error"], side["exit_code"])) and is_transient(TrainingFailed("x"))


def alive(pid: int) -> bool:
    """Running or sleeping: not gone, not a zombie waiting for a parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_for_file(path, what):  # noqa: ANN001, ANN201
    import time

    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return int(path.read_text())


# torchrun as far as its ranks are concerned: each rank in a session of its own, stopped on SIGTERM.
FAKE_TORCHRUN = """
setsid sleep 120 & rank=$!
trap 'kill $rank; wait $rank; exit 143' TERM
echo $rank > "$0"
wait $rank
"""


def test_an_interrupted_launch_stops_its_ranks_through_torchrun(tmp_path):
    """The task's timeout or the worker's SIGTERM (a cancelled run) interrupts the wait: torchrun is
    asked to stop its ranks. subprocess.run killed it at once, and the ranks, each in a session of
    its own, trained on, holding the GPUs the retry needed."""
    import signal
    import subprocess

    class Interrupted(Exception):
        pass

    def interrupt(*_):  # noqa: ANN002, ANN202
        raise Interrupted

    launcher = subprocess.Popen(["/bin/sh", "-c", FAKE_TORCHRUN, str(tmp_path / "rank.pid")])
    rank = wait_for_file(tmp_path / "rank.pid", "the fake torchrun never started its rank")
    before = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(Interrupted):
            distributed.wait_stopping_on_exit(launcher, grace_s=20)
        assert launcher.returncode == 143, "torchrun stopped on SIGTERM, not killed"
        assert not alive(rank), "the rank outlived its launcher"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        if alive(rank):
            __import__("os").kill(rank, signal.SIGKILL)


RANK_OF_A_KILLED_LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c",
    "from protein.modeling import distributed; import time; distributed.exit_with_launcher(0.1); time.sleep(120)"],
    start_new_session=True)
open(sys.argv[1], "w").write(str(rank.pid))
time.sleep(120)
"""


def test_a_rank_ends_itself_when_its_launcher_is_killed(tmp_path, protein_process):
    """torchrun SIGKILLed (the worker's kill after its grace period) cannot stop its ranks."""
    import os
    import signal
    import time

    launcher = protein_process.start_script(RANK_OF_A_KILLED_LAUNCHER, str(tmp_path / "rank.pid"))
    rank = wait_for_file(tmp_path / "rank.pid", "the fake torchrun never started its rank")
    try:
        time.sleep(3)  # the rank imports torch and starts watching
        assert alive(rank)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while alive(rank):
            assert time.monotonic() < deadline, "the rank outlived its killed launcher"
            time.sleep(0.1)
    finally:
        if alive(rank):
            os.kill(rank, signal.SIGKILL)


@pytest.mark.parametrize(("written", "raised", "transient"), [
    ({"error": "s3://b/runs/r/checkpoint.pt: endpoint unreachable", "exit_code": 3, "type": "StoreError"},
     "StoreError", True),
    ({"error": "training run r ran out of memory", "exit_code": 11, "type": "OutOfMemory"}, "OutOfMemory", False),
    ({"error": "superseded", "exit_code": 10, "type": "CheckpointSuperseded"}, "CheckpointSuperseded", False),
    ({"error": "a class of another version", "exit_code": 3, "type": "SomethingNew"}, "RankZeroError", False),
    ({"error": "exit code of another class", "exit_code": 5, "type": "StoreError"}, "RankZeroError", False),
    ({"error": "written before types were", "exit_code": 3}, "RankZeroError", False),
], ids=["store-outage", "out-of-memory", "superseded", "unknown-class", "other-exit-code", "no-type"])
def test_a_ranks_error_comes_back_as_its_own_class(written, raised, transient):
    """A store outage on rank 0 of a --nproc run is retried as on one rank (it came back as
    RankZeroError, never retried: the night lost), and an out-of-memory is OutOfMemory, which the
    retrain catches to fail in one line (it was a RankZeroError traceback)."""
    from protein.pipeline.training import error_of_rank
    from tasks.retry import is_transient

    error = error_of_rank(written)
    assert type(error).__name__ == raised and str(error) == written["error"]
    assert error.exit_code == written["exit_code"] and is_transient(error) is transient


def test_train_on_ranks_raises_the_ranks_error_as_its_class(tmp_path, monkeypatch):
    import json

    from protein.errors import StoreError
    from protein.pipeline import training

    written = {"error": "s3://b/runs/r/checkpoint.pt: endpoint unreachable", "exit_code": 3, "type": "StoreError"}
    jobs: list[dict] = []

    def launch(nproc, argv):  # noqa: ANN001, ANN202
        jobs.append(json.loads(__import__("pathlib").Path(argv[1]).read_text()))
        return 1, written

    monkeypatch.setattr(training.distributed, "launch", launch)
    monkeypatch.setattr(training, "open_training_inputs",
                        lambda *args: type("Inputs", (), {"run_id": "r", "data": None, "data_fingerprint": "f"})())
    monkeypatch.setattr(training, "load_split_images", lambda *args, **kwargs: None)
    with pytest.raises(StoreError, match="endpoint unreachable"):
        training.train_on_ranks(2, tmp_path, str(tmp_path / "store"), TrainConfig(batch_size=8, device="cpu"), "r",
                                actor="prefect-flow-run:f")
    assert jobs[0]["actor"] == "prefect-flow-run:f"  # the ranks register under the flow run that launched them
