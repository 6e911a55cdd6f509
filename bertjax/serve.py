"""`python -m bertjax.serve` (console script `bertjax-serve`): see `bertjax.deploy.serve`, where the command lives."""

import sys

from bertjax.deploy.serve import *  # noqa: F401,F403 - the command's public names, as before it moved
from bertjax.deploy.serve import main

if __name__ == "__main__":
  sys.exit(main())
