"""The pure decisions behind dispatching training to another host: what to do about an attempt,
and which device a run may use."""

from __future__ import annotations

import pytest
from prefect.client.schemas.objects import StateType

from protein.modeling.devices import DevicePolicy, DeviceUnavailable, choose_device
from tasks.dispatch import Step, decide, idempotency_key

GPU_POOL = DevicePolicy(require_cuda=True)


@pytest.mark.parametrize(("state", "started", "alive", "elapsed", "step"), [
    (StateType.COMPLETED, True, None, 10, Step.DONE),
    (StateType.CRASHED, True, None, 10, Step.LOST),
    (StateType.FAILED, True, True, 10, Step.FAILED),
    (StateType.CANCELLED, True, None, 10, Step.FAILED),
    (StateType.RUNNING, True, True, 10, Step.WAIT),
    (StateType.RUNNING, True, False, 10, Step.LOST),  # the worker under a running attempt died
    (StateType.PENDING, False, False, 10, Step.LOST),
    (StateType.SCHEDULED, False, None, 10, Step.WAIT),  # queued for a free GPU slot
    (StateType.RUNNING, True, True, 101, Step.TIMED_OUT),
    (StateType.SCHEDULED, False, None, 101, Step.NEVER_STARTED),  # no gpu worker took it
    (StateType.COMPLETED, True, None, 101, Step.DONE),  # a result beats the clock
])
def test_decide(state: StateType, started: bool, alive: bool | None, elapsed: float, step: Step) -> None:
    assert decide(state, started, alive, elapsed, timeout_s=100) is step


def test_attempts_have_stable_distinct_idempotency_keys() -> None:
    assert idempotency_key("ab12cd34-0f0f0f0f", 1) == idempotency_key("ab12cd34-0f0f0f0f", 1)
    assert idempotency_key("ab12cd34-0f0f0f0f", 1) != idempotency_key("ab12cd34-0f0f0f0f", 2)
    # Training and both scoring steps of one run are different runs, never deduplicated into one.
    keys = {idempotency_key("ab12cd34-0f0f0f0f", 1, step) for step in ("train", "score-gate", "score-predict")}
    assert len(keys) == 3


def test_gpu_pool_without_cuda_fails_loudly_unless_cpu_is_allowed() -> None:
    with pytest.raises(DeviceUnavailable, match="requires a CUDA GPU .* set PROTEIN_ALLOW_CPU=1"):
        choose_device("auto", 0, None, GPU_POOL)
    assert choose_device("auto", 0, None, DevicePolicy(require_cuda=True, allow_cpu=True)) == "cpu"
    assert choose_device("auto", 0, None, DevicePolicy()) == "auto"  # local development: anything goes


def test_one_card_per_worker() -> None:
    assert choose_device("auto", 1, "3", GPU_POOL) == "cuda"
    with pytest.raises(DeviceUnavailable, match="sees 4 CUDA devices and CUDA_VISIBLE_DEVICES is unset"):
        choose_device("auto", 4, None, GPU_POOL)
    with pytest.raises(DeviceUnavailable, match="device 'cpu' requested on the gpu pool"):
        choose_device("cpu", 1, "0", GPU_POOL)


def test_policy_reads_the_environment() -> None:
    assert DevicePolicy.from_env({"PROTEIN_REQUIRE_CUDA": "1", "PROTEIN_ALLOW_CPU": "true"}) == DevicePolicy(True, True)
    assert DevicePolicy.from_env({}, allow_cpu=True) == DevicePolicy(False, True)
    assert DevicePolicy.from_env({"PROTEIN_REQUIRE_CUDA": "0"}) == DevicePolicy()
