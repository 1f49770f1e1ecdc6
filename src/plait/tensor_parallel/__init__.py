"""Tensor parallelism (Megatron-LM) with sequence and loss parallelism, applied by plans."""
from plait.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy_sum
from plait.tensor_parallel.layers import (ColumnParallelLinear, InputMode, OutputMode, ParallelLMHead,
                                          RowParallelLinear, VocabParallelEmbedding)
from plait.tensor_parallel.plan import (ColumnParallel, ParallelHead, PlanError, PrepareInput, RowParallel,
                                        SequenceParallelNorm, VocabParallel, full_grad, full_tensor, llama_plan,
                                        parallelize, sum_partial_grads)
from plait.tensor_parallel.sequence import keep_sequence_shards

__all__ = ["ColumnParallel", "ColumnParallelLinear", "InputMode", "OutputMode", "ParallelHead", "ParallelLMHead", "PlanError", "PrepareInput",
           "RowParallel", "RowParallelLinear", "SequenceParallelNorm", "VocabParallel", "VocabParallelEmbedding",
           "full_grad", "full_tensor", "keep_sequence_shards", "llama_plan", "parallelize", "sum_partial_grads",
           "vocab_parallel_cross_entropy_sum"]
