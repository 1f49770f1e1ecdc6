"""Hardware profiles: what a device computes, holds and moves per second.

Every number of a GPU profile is a datasheet rate times one documented efficiency that holds
for the whole device class (never a per-model or per-row constant):

- ``peak_flops``: dense tensor-core rate per dtype (no sparsity). MFU is measured against it.
- ``gemm_efficiency``: the fraction of the peak that training-sized GEMMs sustain, as two
  factors. (1) Clock: the peak is quoted at the boost clock, but under sustained tensor-core
  load a GPU holds its power-limited clock: A100 1305 of 1410 MHz (0.926, the clock NVIDIA
  itself uses for HPL's Rpeak), H100 about 0.9. (2) Kernel: cuBLAS reaches ~81% of the
  clock's rate on training-sized GEMMs (~86% on the best square shapes). A100: 0.926 x 0.81 =
  0.75; H100/H200: 0.9 x 0.8 = 0.72. Smaller GEMMs lose more: see ``compute.py`` (roofline and
  launch cost). Sensitivity, stated in docs/planner.md: with 0.85 on A100 the Narayanan et al.
  Table 1 predictions rise by 4-11%.
- ``attention_efficiency``: FlashAttention-2's reach (Dao 2023: 50-73% of the peak on A100
  forward, less backward) times the clock factor: 0.55; on H100 FA2 reaches ~35-50%: 0.45.
- ``memory_efficiency``: share of the HBM datasheet bandwidth a streaming kernel reaches (~90%).
- Links: NVLink per GPU and direction (A100: 600 GB/s bidirectional -> 300 GB/s; H100/H200:
  900 -> 450), InfiniBand one NIC per GPU (DGX A100: HDR 200 Gb/s = 25 GB/s; DGX H100: NDR
  400 Gb/s = 50 GB/s). ``link_efficiency`` is the share NCCL's bus bandwidth reaches on them
  (nccl-tests on DGX systems: ~75-80%).

Sources: NVIDIA A100 datasheet (2021), H100 datasheet (2023), H200 product brief (2024),
DGX A100 / DGX H100 user guides (one ConnectX NIC per GPU); FlashAttention-2 paper (Dao 2023).

The ``cpu`` profile is not a datasheet: ``plait calibrate`` measures it on the running machine
(matmul and attention rates per dtype, memory bandwidth, gloo collectives' latency and
bandwidth) and writes it as JSON; ``load_profile('cpu')`` reads it back.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from plait.errors import PlaitError

GB = 1e9
TERA = 1e12


class HardwareError(PlaitError):
    """An unknown or unreadable hardware profile; one line."""


@dataclass(frozen=True)
class LinkFit:
    """t(bytes) = latency + bytes * factor / bandwidth for one collective (factor: ring share),
    and, when measured, the points themselves: (bytes, seconds) at the calibration's group size,
    interpolated between (gloo changes algorithm with the size, which two numbers miss)."""
    latency_s: float
    bandwidth: float  # bytes / s
    points: tuple[tuple[float, float], ...] = ()

    def seconds(self, nbytes: float, factor: float, calibrated_factor: float) -> float:
        if not self.points:
            return self.latency_s + factor * nbytes / self.bandwidth
        sizes = [size for size, _ in self.points]
        times = [t for _, t in self.points]
        # the wire bytes at the calibrated group size that carry the same per-rank volume
        equivalent = nbytes * factor / calibrated_factor
        if equivalent <= sizes[0]:
            return times[0]
        if equivalent >= sizes[-1]:
            return times[-1] + (equivalent - sizes[-1]) * calibrated_factor / self.bandwidth
        for (s0, t0), (s1, t1) in zip(self.points, self.points[1:]):
            if equivalent <= s1:
                return t0 + (t1 - t0) * (equivalent - s0) / (s1 - s0)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: dict[str, float]            # per device (GPU) or per core (cpu), by dtype
    gemm_efficiency: float                  # large-GEMM share of the peak
    attention_efficiency: float             # fused (flash) attention share of the peak
    memory_bytes: float                     # per device
    memory_bandwidth: float                 # bytes/s per device (cpu: per core)
    memory_efficiency: float
    devices_per_node: int
    intra_node_bandwidth: float             # bytes/s per device and direction (NVLink; cpu: shared memory)
    inter_node_bandwidth: float             # bytes/s per device and direction (its NIC)
    intra_node_latency_s: float
    inter_node_latency_s: float
    link_efficiency: float
    kernel_latency_s: float                 # fixed cost of one kernel (launch + tail)
    framework_memory_bytes: float           # CUDA context, NCCL buffers, allocator slack
    comm_overlaps_compute: bool = True      # GPU: copy engines / spare SMs; cpu: gloo shares the cores
    ring_hop_latency_s: float = 3e-6        # one step of a ring across nodes (NCCL's LL protocol over IB)
    cores: int = 0                          # cpu only: ranks of a node share these
    measured_flops: dict[str, float] = field(default_factory=dict)       # cpu: matmul rate per core
    measured_attention: dict[str, float] = field(default_factory=dict)   # cpu: sdpa rate per core
    collectives: dict[str, LinkFit] = field(default_factory=dict)        # cpu: fitted per op
    collective_group_size: int = 2                                       # cpu: ranks they were measured on
    kernel_mix_efficiency: dict[str, float] = field(default_factory=dict)  # cpu: see calibrate.py
    source: str = ""

    @property
    def kind(self) -> str:
        return "cpu" if self.cores else "gpu"

    def matmul_rate(self, dtype: str) -> float:
        """Achievable large-GEMM FLOP/s of one device (cpu: one core)."""
        if dtype in self.measured_flops:
            return self.measured_flops[dtype]
        return self.peak(dtype) * self.gemm_efficiency

    def attention_rate(self, dtype: str) -> float:
        if dtype in self.measured_attention:
            return self.measured_attention[dtype]
        return self.peak(dtype) * self.attention_efficiency

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise HardwareError(f"profile {self.name} has no {dtype} rate (it has {', '.join(self.peak_flops)})")
        return self.peak_flops[dtype]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        values = json.loads(text)
        values["collectives"] = {op: LinkFit(fit["latency_s"], fit["bandwidth"],
                                             tuple(tuple(point) for point in fit.get("points", ())))
                                 for op, fit in values.get("collectives", {}).items()}
        return cls(**values)


def _nvidia(name: str, bf16_tflops: float, fp32_tflops: float, memory_gb: float, hbm_gb_s: float,
            nvlink_gb_s: float, nic_gb_s: float, gemm_efficiency: float, attention_efficiency: float,
            source: str) -> HardwareProfile:
    """``fp32_tflops``: the datasheet's FP32 rate, not TF32's: plait leaves PyTorch's default
    ``torch.backends.cuda.matmul.allow_tf32 = False``, so fp32 products are fp32 (and equal
    another layout's to 1e-5); TF32 would round their inputs to 10 mantissa bits."""
    return HardwareProfile(
        name=name, peak_flops={"bfloat16": bf16_tflops * TERA, "float16": bf16_tflops * TERA,
                               "float32": fp32_tflops * TERA},
        gemm_efficiency=gemm_efficiency, attention_efficiency=attention_efficiency,
        memory_bytes=memory_gb * GB, memory_bandwidth=hbm_gb_s * GB, memory_efficiency=0.9,
        devices_per_node=8, intra_node_bandwidth=nvlink_gb_s * GB, inter_node_bandwidth=nic_gb_s * GB,
        intra_node_latency_s=10e-6, inter_node_latency_s=20e-6, link_efficiency=0.8,
        kernel_latency_s=5e-6, framework_memory_bytes=3 * GB, source=source)


PROFILES: dict[str, HardwareProfile] = {
    "a100-40gb": _nvidia("a100-40gb", 312, 19.5, 40, 1555, 300, 25, 0.75, 0.55,
                         "A100 SXM4 40GB datasheet; DGX A100 (NVLink3, 8x HDR 200 Gb/s)"),
    "a100-80gb": _nvidia("a100-80gb", 312, 19.5, 80, 2039, 300, 25, 0.75, 0.55,
                         "A100 SXM4 80GB datasheet; DGX A100 (NVLink3, 8x HDR 200 Gb/s)"),
    "h100-80gb": _nvidia("h100-80gb", 989, 67, 80, 3350, 450, 50, 0.72, 0.45,
                         "H100 SXM5 80GB datasheet; DGX H100 (NVLink4, 8x NDR 400 Gb/s)"),
    "h200": _nvidia("h200", 989, 67, 141, 4800, 450, 50, 0.72, 0.45,
                    "H200 SXM 141GB product brief; HGX H200 (NVLink4, 8x NDR 400 Gb/s)"),
}
ALIASES = {"a100": "a100-80gb", "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h200-141gb": "h200"}


def default_profile_path() -> Path:
    cache = os.environ.get("PLAIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "plait")
    return Path(cache) / "hardware" / "cpu.json"


def load_profile(name: str) -> HardwareProfile:
    """A built-in GPU profile by name, ``cpu`` (the calibrated profile of this machine), or a JSON file."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in PROFILES:
        return PROFILES[key]
    path = default_profile_path() if key == "cpu" else Path(name)
    if not path.exists():
        if key == "cpu":
            raise HardwareError(f"no cpu profile at {path}: run `plait calibrate` first")
        raise HardwareError(f"unknown hardware {name!r}; choose one of {', '.join([*PROFILES, 'cpu'])} "
                            "or give a profile JSON file")
    try:
        return HardwareProfile.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as error:
        raise HardwareError(f"{path} is not a plait hardware profile: {error}") from None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
