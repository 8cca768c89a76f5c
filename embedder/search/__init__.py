"""Similarity search: index kinds (kinds), building and tuning (build, tune), queries (query), near duplicates (dedup), plots (plots); the public `embedder.Index` over them (api)."""
