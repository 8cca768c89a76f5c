"""The package version, in one place (read by the fingerprint, the CLI and packaging)."""

__version__ = "0.1.0"
