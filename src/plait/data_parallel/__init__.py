"""Data parallelism: plain (bucketed all-reduce) now; ZeRO sharding lands next."""
from plait.data_parallel.ddp import DEFAULT_BUCKET_BYTES, DataParallel

__all__ = ["DEFAULT_BUCKET_BYTES", "DataParallel"]
