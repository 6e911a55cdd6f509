"""`python -m bertjax.search` (console script `bertjax-search`): see `bertjax.deploy.search`, where the command lives."""

import sys

from bertjax.deploy.search import *  # noqa: F401,F403 - the command's public names
from bertjax.deploy.search import main

if __name__ == "__main__":
  sys.exit(main())
