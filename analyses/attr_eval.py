"""Input attributions (saliency, gradient × input, SmoothGrad, IG, DIG, UDIG, LAFA) by log-odds,
comprehensiveness, sufficiency and AOPC on Rotten Tomatoes and SVA (same as `gradgraph attr-eval`).

    .venv/bin/python analyses/attr_eval.py [--sentences 12] [--sva-items 32]
"""

import sys

from gradgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["attr-eval", *sys.argv[1:]]))
