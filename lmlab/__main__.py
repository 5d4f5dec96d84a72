"""`python -m lmlab ...` is the `lmlab` command; torchrun needs it: `torchrun --nproc_per_node=2 -m lmlab train`."""

import sys

from lmlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
