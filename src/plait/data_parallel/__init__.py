"""Data parallelism: plain (bucketed all-reduce, ZeRO-0) and sharded (ZeRO-1/2/3)."""
from plait.data_parallel.ddp import DEFAULT_BUCKET_BYTES, DataParallel
from plait.data_parallel.zero import ZeroDataParallel

__all__ = ["DEFAULT_BUCKET_BYTES", "DataParallel", "ZeroDataParallel"]
