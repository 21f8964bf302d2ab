"""Positional and syntactic heads over a corpus (same as `gradgraph head-types`).

    .venv/bin/python analyses/head_types.py [--corpus sentences.txt]
"""

import sys

from gradgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["head-types", *sys.argv[1:]]))
