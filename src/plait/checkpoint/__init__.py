"""Sharded checkpoints that reshard between layouts (safetensors + JSON, atomic commit)."""
from plait.checkpoint.pieces import Piece, assemble
from plait.checkpoint.store import (CheckpointError, complete_checkpoints, latest_checkpoint, load_checkpoint,
                                    newest_intact_checkpoint, verify_checkpoint,
                                    read_full_state, read_meta, save_checkpoint)

__all__ = ["CheckpointError", "Piece", "assemble", "complete_checkpoints", "latest_checkpoint", "load_checkpoint",
           "newest_intact_checkpoint", "read_full_state", "read_meta", "save_checkpoint", "verify_checkpoint"]
