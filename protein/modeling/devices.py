"""Which device a training run may use: a pure decision over what the host offers and what
the deployment demands, so a GPU-pool run never trains on CPU by surprise and two trainings
never share a card.

The `gpu` deployment sets PROTEIN_REQUIRE_CUDA=1 in its job environment. A host that has no GPU
but must still run it (tests, a dry run) says so explicitly with PROTEIN_ALLOW_CPU=1 in the
worker's environment. On a host with several GPUs each worker owns one card: it is started with
CUDA_VISIBLE_DEVICES=<index> and `--limit 1` (see docs/runbook.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from protein.errors import ProteinError

REQUIRE_CUDA_ENV = "PROTEIN_REQUIRE_CUDA"
ALLOW_CPU_ENV = "PROTEIN_ALLOW_CPU"
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


class DeviceUnavailable(ProteinError):
    """The run demands a device this host does not offer (a usage problem of the deployment)."""

    exit_code = 2


@dataclass(frozen=True)
class DevicePolicy:
    require_cuda: bool = False
    allow_cpu: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, allow_cpu: bool = False) -> DevicePolicy:
        """Read at run time on the worker; `allow_cpu` is the flow parameter of the same meaning."""
        env = os.environ if env is None else env
        return cls(require_cuda=env.get(REQUIRE_CUDA_ENV, "").strip().lower() in TRUE_VALUES,
                   allow_cpu=allow_cpu or env.get(ALLOW_CPU_ENV, "").strip().lower() in TRUE_VALUES)


def choose_device(requested: str, cuda_devices: int, visible_devices: str | None, policy: DevicePolicy) -> str:
    """The device name to train on, or DeviceUnavailable with what to change.

    requested: the TrainConfig's device ('auto', 'cpu', 'cuda', 'cuda:1'); cuda_devices: how many
    CUDA devices this process sees; visible_devices: CUDA_VISIBLE_DEVICES as set (None if unset)."""
    if not policy.require_cuda:
        return requested
    if cuda_devices == 0:
        if policy.allow_cpu:
            return "cpu"
        raise DeviceUnavailable(
            f"this run requires a CUDA GPU ({REQUIRE_CUDA_ENV}=1 on the gpu pool) but the worker sees none; "
            f"fix the host's driver or CUDA_VISIBLE_DEVICES, or set {ALLOW_CPU_ENV}=1 in the worker's "
            "environment to allow training on CPU")
    if requested == "cpu" and not policy.allow_cpu:
        raise DeviceUnavailable(f"device 'cpu' requested on the gpu pool; set {ALLOW_CPU_ENV}=1 to allow it")
    if cuda_devices > 1 and visible_devices is None:
        raise DeviceUnavailable(
            f"the worker sees {cuda_devices} CUDA devices and CUDA_VISIBLE_DEVICES is unset: start one worker "
            "per GPU with CUDA_VISIBLE_DEVICES=<index> and `--limit 1` so two trainings never share a card")
    return "cuda" if requested == "auto" else requested
