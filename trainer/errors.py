"""One exception type for mistakes a user can fix.

Everything raised as ``UserError`` is printed as a single line naming the bad
input and the fix; anything else is a bug and keeps its traceback.
"""

import sys

# The exit code of a process that stopped on a ``UserError``: a restart would stop the same way, so
# the agent ends the job at once, and the chart's podFailurePolicy fails the Job.
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input (flag, config, checkpoint, storage) with a one-line message."""


def report(exc: UserError) -> int:
    """Print the mistake as its one line (``fsdp-train: error: ...``); the exit code that goes with it."""
    print(f"fsdp-train: error: {exc}", file=sys.stderr)
    return EXIT_USER_ERROR
