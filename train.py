"""`python train.py [overrides]` in a clone: the same as `mmkd train [overrides]`."""

import sys

from mmkd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
