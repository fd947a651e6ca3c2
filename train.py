"""Train a student: `python train.py [experiment=NAME] [group=name ...] [key.path=value ...]`."""

import sys

from mmkd.train import main

if __name__ == "__main__":
    sys.exit(main())
