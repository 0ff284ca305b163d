"""Probe an lmrep model: `python probe.py --checkpoint runs/quickstart/checkpoints --out runs/quickstart/probe`."""

import sys

from lmrep.probe_cli import main

if __name__ == "__main__":
    sys.exit(main())
