"""The exception types a user can cause or must act on: each carries a single sentence naming the problem and
the fix. The CLI prints it (`dist-clm: error: ...`) and exits with its `exit_code`, without a traceback."""


class UserError(Exception):
    """Bad input (config, paths, data, checkpoints)."""

    exit_code = 2
    agreed = False  # every rank raised this same sentence (then rank 0 alone prints it)


class DataError(UserError):
    """Prepared data that is damaged (a shard truncated or changed, a token id outside the vocabulary, a bad
    name in an index): the message names the file and says to prepare the data again."""


class PeerLost(UserError):
    """A collective failed: another rank died, stalled past the timeout, or lost its network. Rerunning (a
    SLURM job requeues itself) resumes from the last complete checkpoint."""

    exit_code = 75  # EX_TEMPFAIL, as for a preemption: rerun the same command


def agreed(error: UserError) -> UserError:
    """Mark `error` as raised alike on every rank."""
    error.agreed = True
    return error


class Mismatch(Exception):
    """A part of a run that cannot continue from a checkpoint's state (checkpoint.Stateful.load_state_dict): what
    changed, one phrase per change; the checkpointer names them all in one sentence."""

    def __init__(self, changes: list[str]):
        super().__init__("; ".join(changes))
        self.changes = changes
