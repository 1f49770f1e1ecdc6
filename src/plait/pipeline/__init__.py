"""Pipeline parallelism: chunks of blocks per rank, schedules as data, one executor.

The schedules and the split (plain data and arithmetic, which the planner and the command line
use) load with the package; the executor and the stage code, which need torch, on first use.
"""
from plait.lazy import on_first_use
from plait.pipeline.schedules import (SCHEDULES, Action, Schedule, ScheduleError, analytic_bubble,
                                      bubble_fraction, build_schedule, peak_in_flight, simulate)
from plait.pipeline.split import StageError, balanced_split

__getattr__ = on_first_use(__name__, {
    "PipelineExecutor": "plait.pipeline.executor",
    **{name: "plait.pipeline.stage" for name in ("PipelineChunk", "chunk_forward", "keep_stage", "named_blocks",
                                                 "plan_chunks")}})

__all__ = ["SCHEDULES", "Action", "PipelineChunk", "PipelineExecutor", "Schedule", "ScheduleError", "StageError",
           "analytic_bubble", "balanced_split", "bubble_fraction", "build_schedule", "chunk_forward", "keep_stage",
           "named_blocks", "peak_in_flight", "plan_chunks", "simulate"]
