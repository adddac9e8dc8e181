"""`python -m kfcn.demo [flags]`: the same as `kfcn demo [flags]`."""

import sys

from kfcn.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
