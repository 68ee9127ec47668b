"""The `litefspy` command line: one module per command, `main` parses and dispatches.

`litefspy.cli:main` is the console script's entry point.
"""

from litefspy.cli.main import main

__all__ = ["main"]
