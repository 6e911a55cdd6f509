"""User-facing errors: one clear line, a non-zero exit, nothing overwritten."""


class UserError(Exception):
  """A mistake in the user's input (path, config value, file format).

  The message names the problem and the fix; `bertjax.main` prints it as one line and exits with status 2.
  """
