"""User-facing errors: one clear line, a non-zero exit, nothing overwritten."""


class UserError(Exception):
  """A mistake in the user's input (path, config value, file format).

  The message names the problem and the fix; `bertjax.main` prints it as one line and exits with status 2.
  """


class Diverged(Exception):
  """Training stopped on non-finite values: `training.max_consecutive_skips` non-finite steps in a row, or
  non-finite parameters at a save (never written over the last good checkpoint). `bertjax.main` exits with `code`."""
  code = 3
