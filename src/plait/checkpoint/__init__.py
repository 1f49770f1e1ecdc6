"""Sharded checkpoints that reshard between layouts (safetensors + JSON, atomic commit).

The error and the Hugging Face config reading load with the package; the pieces and the store,
which need torch, on first use.
"""
from plait.checkpoint.errors import CheckpointError
from plait.lazy import on_first_use

__getattr__ = on_first_use(__name__, {
    "Piece": "plait.checkpoint.pieces", "assemble": "plait.checkpoint.pieces",
    **{name: "plait.checkpoint.store" for name in ("complete_checkpoints", "latest_checkpoint", "load_checkpoint",
                                                   "newest_intact_checkpoint", "read_full_state", "read_meta",
                                                   "save_checkpoint", "verify_checkpoint")}})

__all__ = ["CheckpointError", "Piece", "assemble", "complete_checkpoints", "latest_checkpoint", "load_checkpoint",
           "newest_intact_checkpoint", "read_full_state", "read_meta", "save_checkpoint", "verify_checkpoint"]
