"""The SVA study on the embedded model (the main job; `make demo` runs it through `gradgraph sva`).

    .venv/bin/python analyses/sva.py [--limit 96] [--intervention-items 24] [--model NAME]
"""

import sys

from gradgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["sva", *sys.argv[1:]]))
