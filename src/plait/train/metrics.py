"""Run outputs on the logging rank: progress bar, metrics.jsonl, TensorBoard, loss.png.

``metrics.jsonl`` gets one JSON object per optimizer step (and per validation), flushed as it
is written, so a crash loses at most the step in flight.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device, else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int:
    """This process's resident set size now (Linux; elsewhere its peak)."""
    value = _status_bytes("VmRSS:")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_peak_bytes() -> int:
    """This process's peak resident set size since start or the last ``reset_resident_peak``."""
    value = _status_bytes("VmHWM:")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_resident_peak() -> None:
    """Restart ``resident_peak_bytes`` from the current resident size (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the OS, so that the resident size
    is what is alive (a measurement starting from it sees every new page)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryWatch:
    """Peak memory of this rank per phase: resident set on the CPU (what the OS charges the
    process, torch and Python included), allocated bytes on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, int] = {"base": self._now()}
        self._restart()

    def _now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else resident_bytes()

    def _restart(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_resident_peak()

    def end_phase(self, name: str) -> int:
        """The peak since the previous phase ended; starts the next phase."""
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else resident_peak_bytes()
        self.peaks[name] = peak
        self._restart()
        return peak


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 0.3,
                        size: int | None = None) -> float:
    """Best achieved FLOP/s of a square matmul on this rank: the denominator of MFU.

    Timed as a linear layer computes it, x W^T (``F.linear``). The trainer calls it inside
    ``plait.runtime.gemm_context``, so that on CPUs whose bf16 products are emulated it times the
    widened fp32 products the model's layers run too. Best of single products, not their mean:
    a load spike during the measurement only ever slows some of them (a mean once made the
    peak so low that MFU read 188%). On a GPU a product of 1024 is mostly its launch and the
    synchronisation around it: there the products are 8192 square, timed ten at a time."""
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 1024)
    per_timing = 10 if cuda else 1
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        F.linear(a, b)
    fastest, deadline, iterations = math.inf, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline or iterations < 3:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(per_timing):
            F.linear(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        fastest = min(fastest, (time.perf_counter() - start) / per_timing)
        iterations += 1
    return 2 * size ** 3 / fastest


def calibrated_peak(dtype: str, device: torch.device) -> float | None:
    """This rank's matmul peak from ``plait calibrate``'s profile of this machine (per core, times
    the rank's threads), or None on a GPU or when there is no readable profile."""
    if device.type != "cpu":
        return None
    from plait.planner.hardware import default_profile_path, load_profile

    if not default_profile_path().exists():
        return None
    try:
        return load_profile("cpu").peak(dtype) * torch.get_num_threads()
    except ValueError:  # an unreadable profile or one without this dtype: measure instead
        return None


class MetricsLogger:
    def __init__(self, out_dir: Path, total_steps: int, progress: bool = True, tensorboard: bool = True,
                 start_step: int = 0) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = out_dir / "metrics.jsonl"
        if metrics.exists():  # a resumed run: drop records of steps it will run again
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < start_step]
            metrics.write_text("".join(line + "\n" for line in kept))
        self._file = open(metrics, "a", buffering=1)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.history: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self._bar is not None and "loss" in record:
            self._bar.update(1)
            postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.1e}",
                       "tok/s": f"{record['tokens_per_s']:.0f}", "mfu": f"{100 * record['mfu']:.0f}%"}
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.3f}"
            self._bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self, plot: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._file.close()
        if plot:
            plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training (and validation) loss against step, from a metrics.jsonl file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_steps, train_loss, val_steps, val_loss = [], [], [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            train_steps.append(record["step"])
            train_loss.append(record["loss"])
        if "val_loss" in record:
            val_steps.append(record["step"])
            val_loss.append(record["val_loss"])
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(train_steps, train_loss, label="train", linewidth=1)
    if val_steps:
        axis.plot(val_steps, val_loss, "o-", label="validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats / token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
