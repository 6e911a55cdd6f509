"""`python -m bertjax.predict` (console script `bertjax-predict`): see `bertjax.deploy.predict`, where the command lives."""

import sys

from bertjax.deploy.predict import *  # noqa: F401,F403 - the command's public names, as before it moved
from bertjax.deploy.predict import main

if __name__ == "__main__":
  sys.exit(main())
