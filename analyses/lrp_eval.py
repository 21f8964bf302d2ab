"""LRP, Mask-LRP and baselines by deletion; relevance patching against activation patching
(same as `gradgraph lrp-eval`).

    .venv/bin/python analyses/lrp_eval.py [--sentences 200] [--sva-items 200]
"""

import sys

from gradgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["lrp-eval", *sys.argv[1:]]))
