"""Extraction: `config` (EmbedConfig), `core` (the one embed core), `local` and `ray` (the drivers that call it)."""
