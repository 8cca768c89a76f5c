"""Curation from a feature cache: label mistakes, outliers, uniqueness, representatives, leaks, duplicates."""
