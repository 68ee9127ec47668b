"""litefspy: replicated SQLite through a FUSE filesystem, LiteFS-compatible LTX files."""

__version__ = "0.1.0"
