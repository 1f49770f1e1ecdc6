"""``make gpu-check``: everything plait can learn from a GPU machine in one short window.

A GPU (one H200, now and then; no network, its own preinstalled torch) is lent for ~15 minutes,
so this is one command, prepared and exercised on the CPU (``make gpu-check DEVICE=cpu`` runs
the same sections with tiny shapes, and ``tests/test_gpu_check.py`` runs that), that finishes in
about 8 minutes on one H200 and records what it measured:

0. ``environment``: the GPU, torch, and the kernel bf16 ring-attention blocks run with (CUDA
   flash once its self-check on the device passed; else the plain fp32 one);
1. ``tests``: the single-process tests that honour ``PLAIT_TEST_DEVICE`` (model equals
   ``transformers``, RMSNorm's fused CUDA kernel against its eager ops, the fused loss, trainer
   steps, the ring-attention block kernels) on the device;
2. ``cpu_match``: 10 fp32 steps of ``tiny`` on the device against the same run on the CPU;
3. ``throughput``: bf16 training steps of ``llama-125m`` and ``llama-1b`` (tiny on the CPU),
   plait and ``transformers.LlamaForCausalLM`` (SDPA), eager and each decoder layer compiled,
   same batch, alternating steps (``benchmarks/single_rank.py``); MFU against the datasheet
   dense bf16 peak (the GPU's planner profile: ``h200``, ``h100-80gb``, ...) and against the
   measured matmul rate; plait's eager step against the planner's prediction for that profile
   (the first check of its compute model of plait's kernels on a GPU);
4. ``memory``: plait's trainer's peak memory (``torch.cuda.max_memory_allocated``) of the
   biggest model against the planner's prediction for that profile;
   ``profile``: where an eager bf16 step of that model goes, plait's and ``transformers``'
   (``torch.profiler``: each aten op's self time on the device, by kind: matrix products,
   attention, optimizer, casts), and how busy the device was over the step's wall time;
5. ``device_policy``: more local ranks than GPUs is refused in one line before any worker starts;
6. ``multi_rank`` (2 or more GPUs; on the CPU with gloo): dp2, tp2 + SP, pp2 1F1B, ZeRO-3 and
   cp2 (ring and all-to-all) under ``plait train --nproc 2`` against one process, fp32 losses to
   1e-5, pp2 1F1B again with ``llama-125m``'s 12.6 MB messages (above NCCL's buffer, where the
   order of a pair's messages decides whether it hangs), and the all-reduce bus bandwidth;
7. ``context_parallel`` (2 or more GPUs; on the CPU plait's side only): one causal attention of
   [b, heads, S, d] sharded over 2 ranks, plait's ring attention against PyTorch's own
   ``context_parallel`` (which does not run on the CPU): outputs against the full-sequence SDPA
   and forward + backward time.
   (Sections 6 and 7 live in ``gpu_check_multi.py``, the report in ``gpu_check_report.py``.)

Each section is timed and isolated: one that fails is recorded with its error and the others
still run; one that would start past the time budget is recorded as skipped. Results go to
``$GPU_CHECK_OUT`` (default ``runs/gpu-check``): ``results.json`` and ``results.md`` (tables
ready for BENCHMARKS.md), rewritten after every section, so a run stopped from outside keeps
what it measured.

    python benchmarks/gpu_check.py                  # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --device cpu     # the same on this CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/single_rank.py, gpu_check_*.py

from gpu_check_multi import LOSS_TOLERANCE, context_parallel, multi_rank, subprocess_env  # noqa: E402
from gpu_check_report import OP_KINDS, kind_of, markdown  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    """What each section runs on the device: the real check on CUDA, a smoke-sized one on the CPU."""

    models: tuple[tuple[str, int, int], ...]  # (preset, batch, seq_len) of the throughput section
    throughput_steps: int
    compile: bool
    multi_rank_steps: int
    allreduce_bytes: int
    big_messages: tuple[str, int]  # (preset, seq_len) of a pp2 1F1B run whose messages exceed NCCL's buffer
    layouts: tuple[str, ...]        # of MULTI_RANK_LAYOUTS


# llama-1b at 8 x 2048: 16k tokens an optimizer step, so that the step measures the model more than
# AdamW (the planner puts the fused optimizer step at 3.6% of an H200 step here, 6.6% at 4 x 2048;
# a real run accumulates far more tokens a step). All four contestants fit an H200 together (90 GB
# by single_rank.alternation_groups); an H100 alternates eager and compiled apart.
CUDA_SHAPES = Shapes(models=(("llama-125m", 8, 2048), ("llama-1b", 8, 2048)), throughput_steps=10,
                     compile=True, multi_rank_steps=10, allreduce_bytes=256 << 20,
                     big_messages=("llama-125m", 2048),  # 2 x 2048 x 768 fp32: 12.6 MB a message
                     layouts=("dp2", "tp2 + SP", "pp2 1F1B", "dp2 ZeRO-3", "cp2 ring", "cp2 alltoall"))
CPU_SHAPES = Shapes(models=(("tiny", 2, 64),), throughput_steps=2, compile=True, multi_rank_steps=4,
                    allreduce_bytes=4 << 20, big_messages=("tiny", 64),
                    # the suite runs every layout against one process; here the section's own code,
                    # with one launch of ranks per core beside the reference
                    layouts=("pp2 1F1B", "cp2 ring"))


@dataclass
class Check:
    device: torch.device
    shapes: Shapes
    budget_s: float
    out: Path
    started: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, name: str, section: Callable[["Check"], dict], needs_s: float) -> None:
        """Run one section, keeping its figures, or its error, or why it did not start."""
        if self.elapsed() + needs_s > self.budget_s:
            self.results[name] = {"status": "skipped", "why": f"{needs_s:.0f} s needed, "
                                  f"{self.budget_s - self.elapsed():.0f} s of the budget left"}
            print(f"gpu-check: {name}: skipped (out of time)", flush=True)
            return
        start = time.perf_counter()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            figures = section(self)
            status = figures.pop("status", "ok")
            self.results[name] = {"status": status, **figures}
        except Exception as error:  # one broken section must not hide the others' figures
            self.results[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                  "traceback": traceback.format_exc()}
        self.results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"gpu-check: {name}: {self.results[name]['status']} in {self.results[name]['seconds']} s", flush=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()

    def save(self) -> None:
        """results.json and results.md as they stand: after every section, so that a run killed
        from outside (the lent machine's time ran out) still leaves what it measured."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps({"date": str(datetime.date.today()),
                                                           "seconds": round(self.elapsed(), 1),
                                                           "sections": self.results}, indent=2, default=str) + "\n")
        (self.out / "results.md").write_text(markdown(self.results, self.device, self.elapsed()))


def synthetic_data(vocab: int, n_tokens: int = 200_000, seed: int = 0):
    """A learnable token stream (a noisy repeating pattern) with a held-out tail, as the tests use."""
    from plait.data import TokenData

    rng = np.random.default_rng(seed)
    tokens = np.resize(rng.integers(0, vocab, size=97), n_tokens)
    noise = rng.random(n_tokens) < 0.2
    tokens[noise] = rng.integers(0, vocab, size=int(noise.sum()))
    split = int(n_tokens * 0.95)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    return TokenData(train=tokens[:split].astype(dtype), val=tokens[split:].astype(dtype), vocab_size=vocab,
                     eos_id=None, tokenizer=None)


def planner_profile(device: torch.device) -> str:
    """The planner's hardware profile of this GPU (by its name; the lent machines are H200s and
    H100s), ``h200`` when none matches (said in the results)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 0
    for marker, profile in (("H200", "h200"), ("H100", "h100-80gb"),
                            ("A100", "a100-80gb" if memory_gb > 50 else "a100-40gb")):
        if marker in name:
            return profile
    return "h200"


# ----------------------------------------------------------------------------------- sections
def environment(check: Check) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "cpus": os.cpu_count(), "device": str(check.device)}
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 1e9, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    import transformers
    info["transformers"] = transformers.__version__
    from plait.context_parallel.kernels import kernel_for  # bf16 ring-attention blocks: flash once self-checked
    info["ring_attention_kernel"] = kernel_for(torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16,
                                                           device=check.device)).name
    return info


def device_tests(check: Check) -> dict:
    selection = ["tests/test_model.py::test_logits_match_transformers",
                 "tests/test_model.py::test_rms_norm_equals_torchs_own_on_the_cpu_and_on_the_test_device",
                 "tests/test_model.py::test_one_shared_autocast_cast_equals_a_cast_per_matmul",
                 "tests/test_model.py::test_rotary_equals_transformers_bit_for_bit",
                 "tests/test_model.py::test_expanded_kv_heads_give_sdpas_grouped_attention",
                 "tests/test_model.py::test_attention_runs_without_sdpas_math_kernel",
                 "tests/test_loss.py",
                 "tests/test_device.py", "tests/test_context_parallel.py::test_block_kernels_agree_with_sdpa",
                 "tests/test_context_parallel.py::test_block_kernels_stay_fp32_inside_the_trainers_autocast",
                 "tests/test_context_parallel.py::test_the_device_flash_kernel_passes_its_self_check_and_a_wrong_one_falls_back"]
    env = {**subprocess_env(), "PLAIT_TEST_DEVICE": check.device.type}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    figures = {"selection": selection, "summary": summary}
    if result.returncode != 0:
        figures.update(status="failed", output=result.stdout[-4000:] + result.stderr[-2000:])
    return figures


def train_losses(device: torch.device, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from plait.mesh import ParallelContext
    from plait.models import get_preset
    from plait.train import Trainer, TrainConfig

    cfg = TrainConfig(model="tiny", steps=steps, global_batch=8, micro_batch=2, seq_len=64, lr=1e-3,
                      warmup_steps=2, dtype="float32", eval_every=0, progress=False, tensorboard=False,
                      plot=False, peak_tflops=1.0, out="unused", seed=1234, device=device.type)
    data = synthetic_data(256)
    trainer = Trainer(cfg, ParallelContext.single(device), data, get_preset("tiny").replace(vocab_size=256))
    losses = [trainer.train_step(step)["loss"] for step in range(steps)]
    params = {name: param.detach().cpu().clone() for name, param in trainer.model.named_parameters()}
    return losses, params


def cpu_match(check: Check) -> dict:
    """10 fp32 steps on the device against the CPU. Inputs, initial weights and data order are
    the same (generated on the CPU); only the kernels' summation order differs."""
    steps = 10
    on_device, device_params = train_losses(check.device, steps)
    on_cpu, cpu_params = train_losses(torch.device("cpu"), steps)
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(on_device, on_cpu))
    param_error = max(float((device_params[n] - cpu_params[n]).norm() / cpu_params[n].norm()) for n in cpu_params)
    return {"steps": steps, "max_loss_rel_error": loss_error, "max_param_rel_error": param_error,
            "tolerance": LOSS_TOLERANCE, "losses_device": on_device, "losses_cpu": on_cpu,
            "status": "ok" if loss_error <= LOSS_TOLERANCE else "failed"}


def planner_step_s(config, batch: int, seq_len: int, hardware) -> float:
    """The planner's bf16 step time of one rank training ``config`` on ``batch`` x ``seq_len``
    (plait's eager kernels, fused AdamW included): what the measured plait row is held against."""
    from plait.planner.simulator import predict
    from plait.planner.workload import Layout, ModelShape

    layout = Layout(micro_batch=batch, global_batch=batch, dtype="bfloat16")
    return predict(ModelShape.from_llama_config(config, seq_len), layout, hardware).step_time_s


def throughput(check: Check) -> dict:
    from plait.models import get_preset
    from plait.planner.hardware import HardwareError, load_profile
    from plait.train.metrics import measure_matmul_peak
    from single_rank import compare

    dtype = torch.bfloat16
    measured = measure_matmul_peak(dtype, check.device, seconds=1.0, size=8192 if check.device.type == "cuda" else 512)
    profile = planner_profile(check.device) if check.device.type == "cuda" else "cpu"
    try:  # the CPU's profile exists once `plait calibrate` ran
        hardware = load_profile(profile)
    except HardwareError:
        hardware = None
    datasheet = hardware.peak("bfloat16") if check.device.type == "cuda" else None
    rows = []
    for preset, batch, seq_len in check.shapes.models:
        config = get_preset(preset)
        for row in compare(config, check.device, dtype, batch, seq_len, check.shapes.throughput_steps,
                           check.shapes.compile, measured):
            row.update(model=preset, batch=batch, seq_len=seq_len)
            if datasheet and "mfu" in row:
                row["mfu_datasheet"] = row["mfu"] * measured / datasheet
            if row["implementation"] == "plait" and hardware is not None:
                row["planner_step_s"] = planner_step_s(config, batch, seq_len, hardware)
            rows.append(row)
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": "bfloat16", "profile": profile if hardware else None, "matmul_peak_tflops": measured / 1e12,
            "datasheet_peak_tflops": datasheet / 1e12 if datasheet else None, "rows": rows}


def profile_step(loss_fn, model: torch.nn.Module, device: torch.device, ids: torch.Tensor) -> dict:
    """One profiled bf16 step of a single_rank contestant, after two warm-up steps: its wall
    time, the aten ops' self time on the device (on the CPU: self CPU time) in all and by kind,
    and the heaviest ops."""
    from torch.profiler import ProfilerActivity, profile as profiled
    from single_rank import optimizer_for, sync, training_step

    optimizer = optimizer_for(model)

    def step() -> None:
        training_step(loss_fn, model, optimizer, ids[:, :-1], ids[:, 1:], torch.bfloat16, device)
        sync(device)

    for _ in range(2):
        step()
    on_device = device.type == "cuda"
    with profiled(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])) as prof:
        start = time.perf_counter()
        step()
        wall_s = time.perf_counter() - start
    ops = [(event.key, event.count, 1e-6 * (event.self_device_time_total if on_device else event.self_cpu_time_total))
           for event in prof.key_averages() if event.key.startswith("aten::")]
    busy_s = sum(seconds for _, _, seconds in ops)
    if busy_s <= 0:
        raise RuntimeError(f"the profiler recorded no {'device' if on_device else 'CPU'} time (CUPTI missing?)")
    by_kind = dict.fromkeys([kind for kind, _ in OP_KINDS] + ["other"], 0.0)
    for op, _, seconds in ops:
        by_kind[kind_of(op)] += seconds
    top = sorted(ops, key=lambda op: -op[2])[:12]
    return {"wall_s": wall_s, "busy_s": busy_s, "ms_by_kind": {kind: 1e3 * seconds for kind, seconds in by_kind.items()},
            "top_ops": [{"op": op, "calls": calls, "ms": 1e3 * seconds} for op, calls, seconds in top]}


def profile(check: Check) -> dict:
    """Where an eager bf16 step of the biggest throughput model goes, plait's and
    ``transformers``' (``profile_step``): the device's busy time over the step's wall time
    (launch-bound or not) and each kind of op's milliseconds side by side, so that a missed MFU
    or step-time target says what to change first, read from this run rather than from another
    GPU window."""
    from plait.models import get_preset
    from single_rank import contestants

    preset, batch, seq_len = check.shapes.models[-1]
    config = get_preset(preset)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1),
                        generator=torch.Generator().manual_seed(0)).to(check.device)
    runs = contestants(config, check.device, ("plait", "transformers"))  # the weights initialised once
    steps = {}
    for name, (loss_fn, model) in runs.items():
        steps[name] = profile_step(loss_fn, model, check.device, ids)
    del runs
    return {"model": preset, "batch": batch, "seq_len": seq_len,
            "time": "self device time" if check.device.type == "cuda" else "self CPU time", "steps": steps}


def memory(check: Check) -> dict:
    """plait's trainer, bf16, one micro-batch: the measured peak against the planner's."""
    from plait.layout import layout_of
    from plait.mesh import ParallelContext, ParallelDims
    from plait.models import get_preset
    from plait.planner.hardware import load_profile
    from plait.planner.simulator import predict
    from plait.planner.workload import ModelShape
    from plait.train import Trainer, TrainConfig
    from plait.train.metrics import peak_memory_bytes

    preset, batch, seq_len = check.shapes.models[-1]
    config = get_preset(preset)
    cfg = TrainConfig(model=preset, steps=3, global_batch=batch, micro_batch=batch, seq_len=seq_len,
                      dtype="bfloat16", eval_every=0, progress=False, tensorboard=False, plot=False,
                      out="unused", device=check.device.type)
    profile = planner_profile(check.device)
    hardware = load_profile(profile)
    if check.device.type == "cpu":  # the kernels a CPU runs keep more (planner.compute.fused_norms)
        hardware = dataclasses.replace(hardware, cores=1)
    prediction = predict(ModelShape.from_llama_config(config, seq_len), layout_of(cfg, ParallelDims()), hardware)
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    trainer = Trainer(cfg, ParallelContext.single(check.device), synthetic_data(config.vocab_size, 50 * batch * seq_len),
                      config)
    records = [trainer.train_step(step) for step in range(cfg.steps)]
    measured = peak_memory_bytes(check.device)
    predicted = prediction.memory_bytes_per_gpu - hardware.framework_memory_bytes  # the allocator's share
    del trainer
    return {"model": preset, "batch": batch, "seq_len": seq_len, "profile": profile,
            "measured_gb": measured / 1e9, "what": "max_memory_allocated" if check.device.type == "cuda"
            else "process peak resident set", "predicted_gb": predicted / 1e9,
            "ratio_measured_over_predicted": measured / predicted,
            "breakdown_gb": {key: value / 1e9 for key, value in prediction.memory_breakdown.items()},
            # what a layout may fill: the profile's datasheet capacity against what the device reports
            "capacity_gb": {"profile": hardware.memory_bytes / 1e9,
                            "device": (torch.cuda.get_device_properties(check.device).total_memory / 1e9
                                       if check.device.type == "cuda" else None)},
            "trainer_tokens_per_s": records[-1]["tokens_per_s"], "trainer_step_s": records[-1]["step_time_s"]}


def device_policy(check: Check) -> dict:
    """A layout this host cannot place is one line before any worker starts."""
    gpus = torch.cuda.device_count() if check.device.type == "cuda" else 0
    nproc = gpus + 1 if gpus else 2
    args = ["--nproc", str(nproc)] + ([] if gpus else ["--device", "cuda"])
    expected = (f"{nproc} ranks on this host but {gpus} visible GPU" if gpus else "no CUDA device is visible")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([sys.executable, "-m", "plait", "train", "--model", "tiny", "--steps", "1",
                                 "--out", str(Path(tmp) / "run"), "--no-progress", *args], cwd=tmp,
                                env=subprocess_env(), capture_output=True, text=True, timeout=120)
    err = result.stderr.strip()
    ok = result.returncode == 2 and len(err.splitlines()) == 1 and expected in err
    return {"command": f"plait train --model tiny {' '.join(args)}", "exit_code": result.returncode,
            "message": err, "status": "ok" if ok else "failed"}


SECTIONS: list[tuple[str, Callable[[Check], dict], float]] = [
    # (name, section, seconds it may need on the GPU machine: it starts only if they fit)
    ("environment", environment, 1),
    ("tests", device_tests, 60),
    ("cpu_match", cpu_match, 30),
    ("device_policy", device_policy, 20),
    ("throughput", throughput, 180),
    ("memory", memory, 60),
    ("profile", profile, 60),
    ("multi_rank", lambda check: multi_rank(check.device, check.shapes.multi_rank_steps, check.shapes.layouts,
                                            check.shapes.big_messages, check.shapes.allreduce_bytes), 150),
    ("context_parallel", lambda check: context_parallel(check.device), 40),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "runs/gpu-check"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; a section that would not fit is skipped")
    parser.add_argument("--sections", default=",".join(name for name, _, _ in SECTIONS),
                        help="comma-separated subset of the sections, in their order")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: error: no CUDA device is visible here; use --device cpu (make gpu-check DEVICE=cpu)",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks are fp32 (the default, said explicitly)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    check = Check(device, CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES, args.budget, Path(args.out))
    wanted = args.sections.split(",")
    unknown = set(wanted) - {name for name, _, _ in SECTIONS}
    if unknown:
        print(f"gpu-check: error: unknown section(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for name, section, needs_s in SECTIONS:
        if name in wanted:
            check.run(name, section, needs_s if args.device == "cuda" else 0)
    check.save()
    print(markdown(check.results, check.device, check.elapsed()))
    failed = [name for name, figures in check.results.items() if figures["status"] == "failed"]
    print(f"gpu-check: wrote {check.out}/results.json and results.md; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every section that ran passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
