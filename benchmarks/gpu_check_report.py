"""The report of ``make gpu-check`` (``benchmarks/gpu_check.py``): ``results.md``, one row per
section and the tables ready for BENCHMARKS.md, and the kinds the profile section sums its ops by."""
from __future__ import annotations

import datetime

import torch


OP_KINDS = (  # (kind, markers in an aten op's name), first match wins; the rest is "other"
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention", ("attention", "flash")),
    ("optimizer", ("adam",)),
    ("casts and copies", ("aten::_to_copy", "aten::copy_")),
)


def kind_of(op: str) -> str:
    return next((kind for kind, markers in OP_KINDS if any(marker in op for marker in markers)), "other")


def markdown(r: dict[str, dict], device: torch.device, elapsed_s: float) -> str:
    """results.md: one row per section (``summary_of``), then the throughput and profile tables."""
    env = r.get("environment", {})
    lines = [f"`make gpu-check` on {env.get('gpu', device)} ({datetime.date.today()}, torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}), {elapsed_s:.0f} s in all.", "",
             "| section | status | seconds | result |", "|---|---|---|---|"]
    for name, figures in r.items():
        lines.append(f"| {name} | {figures['status']} | {figures.get('seconds', '')} | {summary_of(name, figures)} |")
    rows = r.get("throughput", {}).get("rows", [])
    if rows:
        peak = r["throughput"]
        lines += ["", f"bf16 training step, measured matmul peak {peak['matmul_peak_tflops']:.1f} TFLOP/s"
                  + (f", datasheet {peak['datasheet_peak_tflops']:.0f} TFLOP/s ({peak['profile']})"
                     if peak.get("datasheet_peak_tflops")
                     else ""), "",
                  "| model | batch x seq | implementation | step (s) | tokens/s | MFU (measured peak) | MFU (datasheet) "
                  "| planner's step (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            shape = f"{row['batch']} x {row['seq_len']}"
            if "ratio" in row:
                apart = "" if row.get("alternated", True) else " (timed in separate alternations)"
                lines.append(f"| {row['model']} | {shape} | **{row['implementation']}**{apart} | **{row['ratio']:.3f}** "
                             "| | | | |")
            else:
                datasheet = f"{100 * row['mfu_datasheet']:.1f}%" if "mfu_datasheet" in row else ""
                planner = f"{row['planner_step_s']:.3f} ({peak['profile']})" if "planner_step_s" in row else ""
                lines.append(f"| {row['model']} | {shape} | {row['implementation']} | {row['step_s']:.3f} | "
                             f"{row['tokens_per_s']:.0f} | {100 * row['mfu']:.1f}% | {datasheet} | {planner} |")
    profiled = r.get("profile", {})
    if "steps" in profiled:
        plait, theirs = profiled["steps"]["plait"], profiled["steps"]["transformers"]
        lines += ["", f"One eager bf16 step of {profiled['model']} ({profiled['batch']} x {profiled['seq_len']}), "
                  f"{profiled['time']} of its aten ops, ms:", "", "| kind | plait | transformers |", "|---|---|---|"]
        lines += [f"| {kind} | {plait['ms_by_kind'][kind]:.1f} | {theirs['ms_by_kind'][kind]:.1f} |"
                  for kind in plait["ms_by_kind"]]
        lines += [f"| all (busy) | {1e3 * plait['busy_s']:.1f} | {1e3 * theirs['busy_s']:.1f} |",
                  f"| step's wall time | {1e3 * plait['wall_s']:.1f} | {1e3 * theirs['wall_s']:.1f} |",
                  "", "plait's heaviest ops:", "", "| op | calls | ms | kind |", "|---|---|---|---|"]
        lines += [f"| `{op['op']}` | {op['calls']} | {op['ms']:.1f} | {kind_of(op['op'])} |" for op in plait["top_ops"]]
    return "\n".join(lines) + "\n"


def summary_of(name: str, figures: dict) -> str:
    if figures["status"] in ("failed", "skipped") and ("error" in figures or "why" in figures):
        return str(figures.get("error") or figures.get("why")).replace("|", "/").splitlines()[0][:200]
    if name == "environment":
        return (f"{figures.get('gpu', 'CPU')} x {figures.get('gpus', 1)}, torch {figures['torch']}; "
                f"bf16 ring attention: {figures['ring_attention_kernel']}")
    if name == "tests":
        return figures["summary"]
    if name == "cpu_match":
        return (f"{figures['steps']} fp32 steps: losses within {figures['max_loss_rel_error']:.1e}, "
                f"parameters {figures['max_param_rel_error']:.1e} (tolerance {figures['tolerance']:.0e})")
    if name == "memory":
        return (f"{figures['model']}: {figures['measured_gb']:.2f} GB measured ({figures['what']}) vs "
                f"{figures['predicted_gb']:.2f} GB predicted for {figures['profile']} "
                f"({figures['ratio_measured_over_predicted']:.2f}x)"
                + (f"; capacity {figures['capacity_gb']['device']:.1f} GB on the device, "
                   f"{figures['capacity_gb']['profile']:.0f} GB in the profile" if figures["capacity_gb"]["device"] else ""))
    if name == "profile":
        plait, theirs = figures["steps"]["plait"], figures["steps"]["transformers"]
        return (f"{figures['model']} eager bf16, {figures['time']} over the profiled step's wall time: plait "
                f"{plait['busy_s']:.3f} of {plait['wall_s']:.3f} s, transformers {theirs['busy_s']:.3f} of "
                f"{theirs['wall_s']:.3f} s (by kind below)")
    if name == "device_policy":
        return f"`{figures['command']}`: exit {figures['exit_code']}, {figures['message'][:150]}"
    if name == "multi_rank":
        if "layouts" not in figures:
            return figures.get("why", "")
        parts = [f"{n} {v['max_loss_rel_error']:.1e}" for n, v in figures["layouts"].items()]
        return (f"losses vs 1 process: {', '.join(parts)}; all-reduce {figures['allreduce_mb']} MB "
                f"{figures['allreduce_bus_gb_s']:.1f} GB/s bus ({figures['allreduce_backend']})")
    if name == "context_parallel":
        text = (f"ring attention {figures['shape']}: error {figures['plait_rel_error']:.1e}, "
                f"{1e3 * figures['plait_s']:.1f} ms fwd+bwd")
        if "torch_s" in figures:
            text += (f"; torch context_parallel error {figures['torch_rel_error']:.1e}, "
                     f"{1e3 * figures['torch_s']:.1f} ms; plait / torch {figures['plait_over_torch']:.2f}")
        elif "torch_error" in figures:
            text += f"; torch context_parallel: {figures['torch_error']}"
        return text
    if name == "throughput":
        ratios = [f"{row['model']} {row['implementation'][6:]}: {row['ratio']:.2f}" for row in figures["rows"]
                  if "ratio" in row]
        return "; ".join(ratios)
    return ""
