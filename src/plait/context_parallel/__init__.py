"""Context parallelism: the sequence sharded through the whole block (``--cp``, ``--cp-mode``)."""
from plait.context_parallel.plan import ContextParallelMode, apply_context_parallel
from plait.context_parallel.sequence import context_positions, context_slice

__all__ = ["ContextParallelMode", "apply_context_parallel", "context_positions", "context_slice"]
