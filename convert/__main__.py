"""``python -m convert``: the same as ``tsdsr-convert`` (tsdsr_jax/conversion/command.py)."""

import sys

from tsdsr_jax.conversion.command import main

if __name__ == "__main__":
    sys.exit(main())
