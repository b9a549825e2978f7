"""The exception types a user can cause: each carries a single sentence naming the problem and the fix."""


class UserError(Exception):
    """Bad input (config, paths, data, checkpoints). The CLI prints its message and exits non-zero, no traceback."""


class DataError(UserError):
    """Prepared data that is damaged (a shard truncated or changed, a token id outside the vocabulary, a bad
    name in an index): the message names the file and says to prepare the data again."""
