"""Synthetic validation (Du et al. 2023, §5.1) on the CPU, in a few minutes (same as `gradgraph synthetic`).

    .venv/bin/python analyses/synthetic.py [--seed 0] [--steps 3000] [--induction-seeds 0 1 2]
"""

import sys

from gradgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["synthetic", *sys.argv[1:]]))
