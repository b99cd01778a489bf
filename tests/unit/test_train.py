import dataclasses
import threading

import numpy as np
import pytest
import torch
from torch import nn

from protein.modeling.batches import PREFETCH_THREAD_NAME, iterate_batches, prefetch
from protein.modeling.ema import make_ema
from protein.modeling.optimization import parameter_groups
from protein.modeling.presets import EvalPreset, TrainPreset, dihedral_views
from protein.modeling.scaling import ema_decay_at
from protein.modeling.train import predict_probs, train_one_epoch


def prefetch_threads_started_since(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD_NAME and t not in before]


def still_running_after_join(threads: list[threading.Thread], timeout_s: float = 5.0) -> list[threading.Thread]:
    for thread in threads:
        thread.join(timeout_s)
    return [thread for thread in threads if thread.is_alive()]


def many_batches() -> tuple[np.ndarray, np.ndarray]:
    """16 batches of 4: far more than the queue holds, so the producer is blocked in put when the
    consumer stops."""
    return np.zeros((64, 8, 8, 3), np.uint8), np.zeros((64, 10), np.float32)


def test_prefetch_keeps_order_and_reraises_producer_errors():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise ValueError("corrupt batch")

    before = set(threading.enumerate())
    received = []
    with pytest.raises(ValueError, match="corrupt batch"):
        for item in prefetch(broken()):
            received.append(item)
    assert received == [1]  # what came before the error is delivered, then the error
    assert prefetch_threads_started_since(before) == []


def test_prefetch_thread_ends_when_the_consumer_closes_it_early():
    """A consumer that stops (a CUDA OOM in the step, a cancel) once left the producer blocked for
    ever in put, holding the memory map and pinned batches; each in-process retry leaked another."""
    before = set(threading.enumerate())
    images, targets = many_batches()
    batches = prefetch(iterate_batches(images, targets, np.arange(64), 4))
    next(batches)
    producers = prefetch_threads_started_since(before)
    assert len(producers) == 1
    batches.close()
    assert still_running_after_join(producers) == []


def test_prefetch_thread_ends_when_the_consumer_raises_mid_iteration():
    before = set(threading.enumerate())
    images, targets = many_batches()
    producers: list[threading.Thread] = []

    def train_until_out_of_memory() -> None:
        for step, _ in enumerate(prefetch(iterate_batches(images, targets, np.arange(64), 4))):
            if step == 0:
                producers.extend(prefetch_threads_started_since(before))
            if step == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        train_until_out_of_memory()
    assert len(producers) == 1
    assert still_running_after_join(producers) == []


def test_fit_ends_the_prefetch_thread_when_a_step_fails(tmp_path, monkeypatch):
    """fit closes the epoch's batches: the error's traceback (kept here, as Prefect keeps it for
    its retry decision) holds fit's frame, and with it the batches, alive."""
    from protein.config import TrainConfig
    from protein.labels import LABELS
    from protein.modeling import train
    from protein.storage import open_store
    from tests.helpers import TINY_ARCH

    cpu_batches = train.epoch_batches

    def batches_as_on_cuda(*args, **kwargs):  # prefetch is used on CUDA only
        batches, generators = cpu_batches(*args, **kwargs)
        return prefetch(batches), generators

    producers: list[threading.Thread] = []
    before = set(threading.enumerate())

    def out_of_memory_in_the_first_step(self, config, batches, device, generators, on_batch=None):
        next(batches)
        producers.extend(prefetch_threads_started_since(before))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train, "epoch_batches", batches_as_on_cuda)
    monkeypatch.setattr(train.Training, "train_epoch", out_of_memory_in_the_first_step)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (48, 32, 32, 3), dtype=np.uint8)
    targets = (rng.random((48, len(LABELS))) > 0.7).astype(np.float32)
    config = TrainConfig(arch=TINY_ARCH, image_size=32, epochs=1, batch_size=4, device="cpu")
    with pytest.raises(torch.OutOfMemoryError) as raised:
        train.fit(config, images, targets, np.arange(40), np.arange(40, 48), open_store(str(tmp_path)), "oom")
    assert len(producers) == 1
    assert still_running_after_join(producers) == []
    assert "simulated" in str(raised.value)  # the error, and fit's frame with it, is still held here


def test_predict_probs_ends_the_prefetch_thread_when_the_model_fails(monkeypatch):
    """predict_probs closes its batches: the error's traceback holds its frame alive, and with it
    a prefetch thread blocked on a full queue with pinned batches, for as long as the error is kept."""
    from protein.modeling import train

    cpu_batches = train.prediction_batches

    def batches_as_on_cuda(images, indices, batch_size, device):  # prefetch is used on CUDA only
        return prefetch(cpu_batches(images, indices, batch_size, device))

    before = set(threading.enumerate())
    producers: list[threading.Thread] = []

    class OutOfMemoryModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            producers.extend(prefetch_threads_started_since(before))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train, "prediction_batches", batches_as_on_cuda)
    images, _ = many_batches()
    with pytest.raises(torch.OutOfMemoryError) as raised:
        predict_probs(OutOfMemoryModel(), images, EvalPreset(), torch.device("cpu"), batch_size=4)
    assert len(producers) == 1
    assert still_running_after_join(producers) == []
    assert "simulated" in str(raised.value)  # the error, and predict_probs's frame with it, is still held here


def test_iterate_batches_covers_each_index_once_in_seeded_order():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    targets = np.eye(10, dtype=np.float32)
    indices = np.array([0, 2, 3, 5, 7, 9])
    first = [x[:, 0, 0, 0].tolist() for x, _ in iterate_batches(images, targets, indices, 4,
                                                                  torch.Generator().manual_seed(1))]
    again = [x[:, 0, 0, 0].tolist() for x, _ in iterate_batches(images, targets, indices, 4,
                                                                  torch.Generator().manual_seed(1))]
    assert first == again and [len(b) for b in first] == [4, 2]
    assert sorted(v for b in first for v in b) == indices.tolist()
    for x, y in iterate_batches(images, targets, indices, 4):
        assert (y.argmax(1).numpy() == x[:, 0, 0, 0].numpy()).all()  # labels travel with their images


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))


def test_weight_decay_skips_norms_and_biases():
    decay, no_decay = parameter_groups(tiny_net(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(tuple(p.shape) for p in decay["params"]) == [(4, 3, 3, 3), (10, 4)]
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias


def test_ema_is_updated_every_step_and_averages_weights_and_buffers():
    model = tiny_net()
    ema = make_ema(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    images = torch.randint(0, 255, (8, 8, 8, 3), dtype=torch.uint8)
    targets = (torch.rand(8, 10) > 0.5).float()
    head_before = model[5].weight.detach().clone()
    snapshots, running_means = [], []

    class Spy(nn.Module):  # in batch k's loss: the weights after step k-1, BN stats after forward k
        def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            snapshots.append([p.detach().clone() for p in model.parameters()])
            running_means.append(model[1].running_mean.clone())
            return nn.functional.binary_cross_entropy_with_logits(logits, y)

    train_one_epoch(model, iter([(images[:4], targets[:4]), (images[4:], targets[4:])]), optimizer, scheduler,
                    Spy(), TrainPreset(), torch.device("cpu"), ema=ema)
    after = [p.detach() for p in model.parameters()]
    # First update copies the weights after step 1; the second averages with the warm-up decay
    # min(0.5, 1/10): the average starts from trained weights, not the random initialisation.
    step1, d = snapshots[1], ema_decay_at(1, 0.5)
    assert d == pytest.approx(0.1)
    for avg, w1, w2 in zip(ema.module.parameters(), step1, after, strict=True):
        assert torch.allclose(avg, d * w1 + (1 - d) * w2, atol=1e-6)
    assert not torch.allclose(ema.module[5].weight, head_before)
    assert not torch.allclose(ema.module[5].weight, model[5].weight)
    # BatchNorm statistics are averaged too (use_buffers), not left at their initial values.
    assert torch.allclose(ema.module[1].running_mean, d * running_means[0] + (1 - d) * running_means[1], atol=1e-6)
    assert int(ema.n_averaged) == 2


def test_predict_probs_with_tta_is_the_mean_of_the_eight_views():
    model = tiny_net().eval()
    images = np.random.default_rng(0).integers(0, 255, (3, 9, 9, 3), dtype=np.uint8)
    preset = EvalPreset()
    plain = predict_probs(model, images, preset, torch.device("cpu"))
    tta = predict_probs(model, images, preset, torch.device("cpu"), tta=True)
    with torch.no_grad():
        x = preset(torch.from_numpy(images))
        expected = torch.stack([torch.sigmoid(model(v)) for v in dihedral_views(x)]).mean(0).numpy()
    assert np.allclose(tta, expected, atol=1e-6)
    assert not np.allclose(tta, plain)  # the net is not symmetric: TTA changes the numbers


def test_only_a_checkpoint_that_training_continues_from_holds_the_optimizer_state(tmp_path):
    """Epoch 1 of 2 keeps the optimizer's state (training continues from it); the last epoch's
    checkpoint drops it (a retry only skips training), a third of resnet18's bytes under AdamW. A
    retry resumes the finished run without training; a checkpoint to continue from that lacks the
    state is refused in one line."""
    from protein.config import TrainConfig
    from protein.labels import LABELS
    from protein.modeling.checkpoints import checkpoint_key, load_checkpoint, save_checkpoint
    from protein.modeling.train import fit
    from protein.storage import open_store
    from tests.helpers import TINY_ARCH

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    targets = (rng.random((24, len(LABELS))) > 0.7).astype(np.float32)
    config = TrainConfig(arch=TINY_ARCH, image_size=32, epochs=2, batch_size=8, device="cpu")
    store = open_store(str(tmp_path / "store"))
    seen: list[dict] = []
    first = fit(config, images, targets, np.arange(18), np.arange(18, 24), store, "r1",
                on_epoch=lambda record: seen.append(load_checkpoint(store, "r1")))
    assert [c["epoch"] for c in seen] == [1, 2] and first.resumed_from_epoch == 0
    assert {"optimizer", "scheduler"} <= seen[0].keys()
    assert not {"optimizer", "scheduler"} & seen[1].keys()
    assert seen[1]["model"].keys() == first.model.state_dict().keys()

    batches: list[int] = []
    again = fit(config, images, targets, np.arange(18), np.arange(18, 24), store, "r1", on_batch=batches.append)
    assert again.resumed_from_epoch == 2 and batches == []
    for name, weight in first.model.state_dict().items():
        assert torch.equal(weight, again.model.state_dict()[name]), name

    save_checkpoint(store, "r2", {**seen[1], "epoch": 1})  # epoch 1 of 2, without the optimizer's state
    from protein.errors import DataError, ProteinError

    with pytest.raises(ProteinError, match=r"store/runs/r2/checkpoint\.pt: the checkpoint of epoch 1 of 2 holds no "
                                         r"optimizer state to continue from; use a new --run-id"):
        fit(config, images, targets, np.arange(18), np.arange(18, 24), store, "r2")
    assert checkpoint_key("r2") in store.list("runs/")

    # Another dataset under the run id (a push between two attempts of a standalone train): refused,
    # one line, before a step; the same data resumes; a usage error (exit 2), never retried as transient.
    three = dataclasses.replace(config, epochs=3)
    save_checkpoint(store, "r3", {**seen[0], "config": seen[0]["config"] | {"epochs": 3}, "data_fingerprint": "a" * 32})
    refused = r"^run r3 was started on data a{16}, not this data \(b{16}\): .* new --run-id$"
    with pytest.raises(DataError, match=refused):
        fit(three, images, targets, np.arange(18), np.arange(18, 24), store, "r3", data_fingerprint="b" * 32,
            on_batch=lambda n: pytest.fail("trained on other data"))
    resumed = fit(three, images, targets, np.arange(18), np.arange(18, 24), store, "r3", data_fingerprint="a" * 32)
    assert resumed.resumed_from_epoch == 1
    assert load_checkpoint(store, "r3")["data_fingerprint"] == "a" * 32


def test_a_run_id_that_registered_a_model_of_other_data_is_refused_not_returned(tmp_path, monkeypatch):
    """A rerun of a finished run id on other data (a push since, a reused --run-id) returned the old
    model as this data's, its data_fingerprint written in the result as the new data's."""
    from protein.config import TrainConfig
    from protein.errors import DataError
    from protein.pipeline import training
    from tests.helpers import TINY_ARCH, write_dataset

    class RegistryWithTheRun:
        def __init__(self, store, actor=None):
            pass

        def find_by_run(self, run_id):
            return "v-old" if run_id == "r1" else None

        def spec(self, version):
            return {"data_fingerprint": "0" * 32, "train_config": {"epochs": 1}, "metrics": {}}

    monkeypatch.setattr(training, "Registry", RegistryWithTheRun)
    monkeypatch.setattr(training, "load_split_images", lambda *args, **kwargs: pytest.fail("decoded after the refusal"))
    data = write_dataset(tmp_path / "ds", {str(i): "0" for i in range(6)}, ["9"], size=8)
    config = TrainConfig(arch=TINY_ARCH, image_size=32, epochs=1, batch_size=2, device="cpu")
    with pytest.raises(DataError, match=r"^run r1 already registered v-old, trained on data 0{16}, not this data "):
        training.train_and_register(data, str(tmp_path / "store"), config, run_id="r1")


def test_a_resume_goes_on_only_on_the_split_its_checkpoint_trained_on(tmp_path):
    """Since byte-identical images are kept on one side of the split, data with copies splits
    otherwise than before; a checkpoint recorded only config and data, so a run checkpointed by the
    old split resumed on the new one and its holdout held rows its weights trained on. The split is
    recorded now: another split is refused, and a checkpoint without one resumes only on data
    without copies (whose split is unchanged)."""
    import shutil

    from protein.config import TrainConfig
    from protein.errors import DataError
    from protein.modeling.checkpoints import checkpoint_key, load_checkpoint, save_checkpoint
    from protein.pipeline import training
    from protein.storage import open_store
    from tests.helpers import TINY_ARCH, write_dataset

    class Stop(Exception):
        pass

    def stop_after_epoch_one(record: dict) -> None:
        if record["epoch"] == 1:
            raise Stop

    def rewrite(store, state: dict) -> None:  # noqa: ANN001
        save_checkpoint(store, "r", state, expected_etag=store.etag(checkpoint_key("r")))

    labels = {str(i): str(i % 3) for i in range(12)}
    config = TrainConfig(arch=TINY_ARCH, image_size=16, epochs=2, batch_size=4, device="cpu")
    for name, copies in (("copies", True), ("unique", False)):
        data = write_dataset(tmp_path / name, labels, ["90"], size=16)
        if copies:
            shutil.copyfile(data / "train" / "0.png", data / "train" / "7.png")
        store_uri, cache = str(tmp_path / f"store-{name}"), tmp_path / f"cache-{name}"
        with pytest.raises(Stop):
            training.train_and_register(data, store_uri, config, run_id="r", cache_dir=cache,
                                        on_epoch=stop_after_epoch_one)
        store = open_store(store_uri)
        state = load_checkpoint(store, "r")
        assert len(state["split_digest"]) == 64

        rewrite(store, {**state, "split_digest": "e" * 64})
        with pytest.raises(DataError, match=r"^run r was trained on split e{16}, not this run's split \([0-9a-f]{16}\)"
                                            r": .* use a new --run-id$"):
            training.train_and_register(data, store_uri, config, run_id="r", cache_dir=cache,
                                        on_batch=lambda n: pytest.fail("trained on another split"))

        # Written before the split was recorded.
        rewrite(store, {k: v for k, v in state.items() if k != "split_digest"})
        if copies:
            with pytest.raises(DataError, match=r"^run r's checkpoint does not record its split, .* start a new run"):
                training.train_and_register(data, store_uri, config, run_id="r", cache_dir=cache,
                                            on_batch=lambda n: pytest.fail("trained on a split that may differ"))
            rewrite(store, state)
        result = training.train_and_register(data, store_uri, config, run_id="r", cache_dir=cache)
        assert result["resumed_from_epoch"] == 1
