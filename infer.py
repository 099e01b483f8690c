"""``python infer.py --model MODEL_DIR -i INPUT -o OUTDIR``: the same as ``tsdsr-infer``
(tsdsr_jax/inference/command.py), from a checkout."""

import sys

from tsdsr_jax.inference.command import main

if __name__ == "__main__":
    sys.exit(main())
