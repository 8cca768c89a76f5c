"""Constants of the cache's on-disk schema, importable without h5py (the CLI's option parsing reads them)."""

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"  # CACHE.h5.partial/: the committed parts of a run in progress
SHARDS_SUFFIX = ".shards"  # CACHE.h5.shards/: the shard files of a --backend ray run
FEATURE_DTYPES = ("float32", "float16")
