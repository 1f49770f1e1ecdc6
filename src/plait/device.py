"""Where a rank runs: the ``--device`` policy, as one pure rule and its reading of this host.

``--device auto`` (the default) takes CUDA when a GPU is visible, else the CPU; ``cuda`` insists
on it; ``cpu`` uses the CPU even on a GPU host. The backend follows the device: NCCL on CUDA,
gloo on the CPU. NCCL needs a GPU of its own per rank (two ranks on one GPU fail inside
``init_process_group`` or at the first collective, deep in a worker), so with CUDA there must be
at least as many visible GPUs as ranks on this host; rank ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``.

``device_plan`` is the rule as a function of what it depends on (requested device, visible GPUs,
local ranks), so it is tested without a GPU; ``host_device_plan`` applies it to this process:
``plait train`` calls it before launching its ``--nproc`` workers and every worker calls it
again with the launcher's ``LOCAL_WORLD_SIZE`` (what ``torchrun`` placed on the host).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from plait.errors import PlaitError

if TYPE_CHECKING:  # torch loads when a device is first asked for: `plait --help` does without it
    import torch


class DeviceError(PlaitError):
    """A device request this host cannot meet; the message is one line."""


class DeviceRequest(str, enum.Enum):
    AUTO = "auto"  # CUDA when a GPU is visible, else the CPU
    CUDA = "cuda"
    CPU = "cpu"

    @classmethod
    def parse(cls, value: "DeviceRequest | str") -> "DeviceRequest":
        try:
            return cls(value)
        except ValueError:
            raise DeviceError(f"--device must be one of {', '.join(r.value for r in cls)}, got {value!r}") from None


@dataclass(frozen=True)
class DevicePlan:
    """The device type of every rank on this host and the process-group backend it implies."""

    kind: str     # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    def device(self, local_rank: int = 0) -> torch.device:
        import torch
        return torch.device("cuda", local_rank) if self.kind == "cuda" else torch.device("cpu")


CPU_PLAN = DevicePlan("cpu", "gloo")
CUDA_PLAN = DevicePlan("cuda", "nccl")


def device_plan(requested: DeviceRequest | str, visible_gpus: int, local_ranks: int) -> DevicePlan:
    """The rule: which device and backend ``local_ranks`` ranks on a host with ``visible_gpus`` use."""
    requested = DeviceRequest.parse(requested)
    if requested is DeviceRequest.CPU or (requested is DeviceRequest.AUTO and visible_gpus == 0):
        return CPU_PLAN
    if visible_gpus == 0:
        raise DeviceError("--device cuda, but no CUDA device is visible here (torch.cuda.is_available() is "
                          "False); use --device cpu (or auto)")
    if local_ranks > visible_gpus:
        ranks = f"{local_ranks} ranks" if local_ranks > 1 else "1 rank"
        gpus = f"{visible_gpus} visible GPU" + ("s" if visible_gpus > 1 else "")
        at_most = f"{visible_gpus} local rank" + ("s" if visible_gpus > 1 else "")
        raise DeviceError(f"{ranks} on this host but {gpus}: NCCL needs one GPU per rank; run at most "
                          f"{at_most} (--nproc {visible_gpus}), or --device cpu to train on the CPU with gloo")
    return CUDA_PLAN


def visible_gpus() -> int:
    """CUDA devices this process may use (0 on a CPU-only build)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def host_device_plan(requested: DeviceRequest | str = DeviceRequest.AUTO, local_ranks: int | None = None) -> DevicePlan:
    """``device_plan`` for this host; ``local_ranks`` defaults to the launcher's LOCAL_WORLD_SIZE."""
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return device_plan(requested, visible_gpus(), local_ranks)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: through pinned memory without waiting on CUDA, as is on the CPU."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
