"""The one exception type a user can cause: it carries a single sentence naming the problem and the fix."""


class UserError(Exception):
    """Bad input (config, paths, data, checkpoints). The CLI prints its message and exits non-zero, no traceback."""
