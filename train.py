"""``python train.py --config configs/tsd.py [--config.key=value ...]``: the same as
``tsdsr-train`` (tsdsr_jax/training/command.py), from a checkout."""

import sys

from tsdsr_jax.training.command import main

if __name__ == "__main__":
    sys.exit(main())
