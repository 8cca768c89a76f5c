"""The HDF5 feature cache: schema and reader, the crash-safe writer, sharded views, fingerprints."""
