"""Pipeline parallelism: chunks of blocks per rank, schedules as data, one executor."""
from plait.pipeline.executor import PipelineExecutor
from plait.pipeline.schedules import (SCHEDULES, Action, Schedule, ScheduleError, analytic_bubble,
                                      bubble_fraction, build_schedule, peak_in_flight, simulate)
from plait.pipeline.stage import (PipelineChunk, StageError, balanced_split, chunk_forward, keep_stage, named_blocks,
                                  plan_chunks)

__all__ = ["SCHEDULES", "Action", "PipelineChunk", "PipelineExecutor", "Schedule", "ScheduleError", "StageError",
           "analytic_bubble", "balanced_split", "bubble_fraction", "build_schedule", "chunk_forward", "keep_stage",
           "named_blocks", "peak_in_flight", "plan_chunks", "simulate"]
