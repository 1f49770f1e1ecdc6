"""Cost model, layout search and simulator: predict memory, step time and MFU of a layout
before any device runs it (see docs/planner.md)."""
from plait.planner.hardware import PROFILES, HardwareError, HardwareProfile, load_profile
from plait.planner.search import PlanResult, plan
from plait.planner.simulator import LayoutRejected, Prediction, predict
from plait.planner.workload import Layout, ModelShape, check_layout

__all__ = ["PROFILES", "HardwareError", "HardwareProfile", "Layout", "LayoutRejected", "ModelShape", "PlanResult",
           "Prediction", "check_layout", "load_profile", "plan", "predict"]
