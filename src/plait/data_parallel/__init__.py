"""Data parallelism behind one strategy interface: replicated (bucketed all-reduce, ZeRO-0) and
sharded (ZeRO-1/2/3)."""
from plait.data_parallel.replicated import DEFAULT_BUCKET_BYTES, GradientBuckets, Replicated
from plait.data_parallel.strategy import DataParallelStrategy, ParameterSource, TiedWeights
from plait.data_parallel.zero import FlatLayout, Sharded

__all__ = ["DEFAULT_BUCKET_BYTES", "DataParallelStrategy", "FlatLayout", "GradientBuckets", "ParameterSource",
           "Replicated", "Sharded", "TiedWeights"]
