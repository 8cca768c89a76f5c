"""Where images come from: SOURCE listings, robust decoding, input geometry, splits, sample data."""
