"""`python -m litefspy`: the command line."""

from litefspy.cli import main

# Guarded: a `spawn` worker process (backup/worker.py) imports this module as
# __mp_main__ and must not run the command line again.
if __name__ == "__main__":
    raise SystemExit(main())
