"""Pictures of pipeline schedules: simulated (from the action lists) or measured (a run's timeline).

Rows are pipeline ranks, the x axis is time; forward slots are blue, backward slots green,
deferred weight-gradient slots (zero bubble's W) orange (darker for later chunks when
interleaving), each labelled with its micro-batch; white is the bubble. The measured timeline is also written as Chrome-trace / Perfetto JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from plait.pipeline.schedules import Slot

_FORWARD = ("#9ecae1", "#4292c6", "#08519c", "#08306b")
_BACKWARD = ("#a1d99b", "#41ab5d", "#006d2c", "#00441b")
_WEIGHT = ("#fdae6b", "#f16913", "#a63603", "#7f2704")
_PALETTES = {"F": _FORWARD, "B": _BACKWARD, "W": _WEIGHT}
_CATEGORIES = {"F": "forward", "B": "backward", "W": "weight gradients"}


def draw_slots(slots: Iterable[Slot], pp: int, path: str | Path, title: str, pp_size_chunks: int = 1,
               time_unit: str = "time (unit = one forward)") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slots = list(slots)
    makespan = max(slot.end for slot in slots)
    per_rank = max(sum(1 for slot in slots if slot.rank == rank) for rank in range(pp))
    figure, axis = plt.subplots(figsize=(min(18, 5 + 0.5 * per_rank), 0.6 * pp + 1.6))
    for slot in slots:
        local_chunk = slot.chunk // pp
        palette = _PALETTES[slot.kind]
        color = palette[min(local_chunk, len(palette) - 1)]
        axis.barh(slot.rank, slot.end - slot.start, left=slot.start, height=0.8, color=color,
                  edgecolor="black", linewidth=0.4)
        width = slot.end - slot.start
        if width > 0.012 * makespan:
            axis.text(slot.start + width / 2, slot.rank, str(slot.microbatch), ha="center", va="center",
                      fontsize=7, color="white" if local_chunk else "black")
    axis.set_yticks(range(pp))
    axis.set_yticklabels([f"rank {r}" for r in range(pp)])
    axis.invert_yaxis()
    axis.set_xlim(0, makespan)
    axis.set_xlabel(time_unit)
    axis.set_title(title, fontsize=10)
    from matplotlib.patches import Patch
    kinds = [kind for kind in _PALETTES if any(slot.kind == kind for slot in slots)]
    axis.legend(handles=[Patch(color=_PALETTES[kind][0], label=_CATEGORIES[kind]) for kind in kinds]
                + [Patch(facecolor="white", edgecolor="gray", label="idle (bubble)")],
                loc="upper center", bbox_to_anchor=(0.5, -0.35 if pp < 3 else -0.2), ncol=4, fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_chrome_trace(slots: Iterable[Slot], path: str | Path) -> None:
    """Chrome-trace / Perfetto JSON: one process per rank, times in microseconds."""
    events = [{"name": f"{slot.kind}{slot.microbatch}" + (f" c{slot.chunk}" if slot.chunk else ""),
               "cat": _CATEGORIES[slot.kind], "ph": "X", "pid": slot.rank, "tid": 0,
               "ts": slot.start * 1e6, "dur": (slot.end - slot.start) * 1e6} for slot in slots]
    events += [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"pipeline rank {rank}"}}
               for rank in sorted({slot.rank for slot in slots})]
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
