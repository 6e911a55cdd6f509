"""`python -m bertjax.quantize` (console script `bertjax-quantize`): see `bertjax.deploy.quantize`, where the command lives."""

import sys

from bertjax.deploy.quantize import *  # noqa: F401,F403 - the command's public names, as before it moved
from bertjax.deploy.quantize import main

if __name__ == "__main__":
  sys.exit(main())
