"""The on-disk store: the whole format of a run's records, gradients and embeddings (see schema.py).

Nothing here imports the capture, the recursion or the queries: they build on this package.
"""

from .arrays import (HEADER_BYTES, AppendableArray, MappedArrays, PrefetchedRows, RowFile, RowReader, read_json,
                     release_pages, write_json_atomic, write_text_atomic)
from .reader import SHARDS_DIR, ShardedRows, Store, shard_path
from .schema import (FORMAT_VERSION, MANIFEST, PROJECTIONS, RECORD_DTYPE, LayerSpec, StepRecord, StoreConfig,
                     StoreError, all_finite, check_name, dtype_name, read_layers, safe_name, store_fingerprint,
                     to_numpy, to_torch, second_moment_factors, whitening_factors, whitening_level,
                     write_projections)
from .writer import BackgroundWriter, DistributedIndex, StoreWriter

__all__ = [
    "HEADER_BYTES", "AppendableArray", "MappedArrays", "PrefetchedRows", "RowFile", "RowReader", "read_json",
    "release_pages", "write_json_atomic", "write_text_atomic", "SHARDS_DIR", "ShardedRows", "Store", "shard_path",
    "FORMAT_VERSION", "MANIFEST", "PROJECTIONS", "RECORD_DTYPE", "LayerSpec", "StepRecord", "StoreConfig",
    "StoreError", "all_finite", "check_name", "dtype_name", "safe_name", "store_fingerprint", "read_layers", "to_numpy", "to_torch", "second_moment_factors",
    "whitening_factors",
    "whitening_level", "write_projections", "BackgroundWriter", "DistributedIndex", "StoreWriter",
]
