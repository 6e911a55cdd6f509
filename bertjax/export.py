"""`python -m bertjax.export` (console script `bertjax-export`): see `bertjax.deploy.export`, where the command lives."""

import sys

from bertjax.deploy.export import *  # noqa: F401,F403 - the command's public names, as before it moved
from bertjax.deploy.export import main

if __name__ == "__main__":
  sys.exit(main())
