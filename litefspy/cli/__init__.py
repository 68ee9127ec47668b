"""The `litefspy` command line: one module per command, `entry.main` parses and dispatches.

`litefspy.cli:main` is the console script's entry point (the module is not called
`main`, which this function would hide).
"""

from litefspy.cli.entry import main

__all__ = ["main"]
