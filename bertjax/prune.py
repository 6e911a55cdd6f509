"""`python -m bertjax.prune` (console script `bertjax-prune`): see `bertjax.deploy.prune`, where the command lives."""

import sys

from bertjax.deploy.prune import *  # noqa: F401,F403 - the command's public names, as before it moved
from bertjax.deploy.prune import main

if __name__ == "__main__":
  sys.exit(main())
