"""The package version (a leaf module: what saved models record as ``mmzoo_version``)."""

__version__ = "0.1.0"
