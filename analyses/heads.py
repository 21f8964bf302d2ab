"""Head ranking by every method for your prompts (same as `gradgraph heads`).

    .venv/bin/python analyses/heads.py --prompts prompts.txt --good " are" --bad " is"
"""

import sys

from gradgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["heads", *sys.argv[1:]]))
