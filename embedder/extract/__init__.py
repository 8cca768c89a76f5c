"""Extraction: the embed configuration, the one embed core, the local and the Ray drivers."""
