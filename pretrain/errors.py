"""The one exception type that means "the user gave us something wrong" (exit status 2, no traceback)."""


class UserError(Exception):
    """A problem the user can fix: bad config key or value, no shards matched, unreadable checkpoint.

    The message is one line saying what was wrong, which value, and what to do.
    """


EXIT_USER_ERROR = 2
"""Bad config, no shards matched, unreadable checkpoint: one line on stderr, no traceback (argparse's status too)."""
EXIT_REQUEUE = 75
"""The trainer checkpointed on SIGTERM/SIGUSR1 and stopped early: launch scripts requeue the job (EX_TEMPFAIL)."""
EXIT_PEER_FAILED = 3
"""This rank stopped because another rank of the job failed or stopped answering (its message says which)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): what a one-line error quotes."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
