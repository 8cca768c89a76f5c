"""Similarity search: FAISS indexes built from a cache and queried, near duplicates, plots."""
