"""`python -m optimizer.routing MODEL_DIR --prompts NAME=FILE ... [--out DIR]`: routing analysis of a Mixtral.

Thin entry point; the analysis lives in optimizer/moe/routing.py and the CLI in optimizer/moe/routing_cli.py.
"""

import sys

from optimizer.moe.routing_cli import main

if __name__ == "__main__":
    sys.exit(main())
