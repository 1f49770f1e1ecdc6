"""The one error of checkpoints: a checkpoint (or Hugging Face directory) that cannot be used here."""
from plait.errors import PlaitError


class CheckpointError(PlaitError):
    """A checkpoint that cannot be used here; one line."""
