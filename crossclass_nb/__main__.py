"""`python -m crossclass_nb ARGS` runs the `crossclass` command line (the form `torchrun -m crossclass_nb` needs)."""
import sys

from crossclass_nb.cli import main

if __name__ == "__main__":
    sys.exit(main())
