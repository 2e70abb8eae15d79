"""Dataset readers and generators for the standard formats and the embedded data."""
