"""``python -m convert.export``: the same as ``tsdsr-export`` (tsdsr_jax/conversion/export.py)."""

import sys

from tsdsr_jax.conversion.export import main

if __name__ == "__main__":
    sys.exit(main())
