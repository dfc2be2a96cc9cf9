"""One exception type for mistakes a user can fix.

Everything raised as ``UserError`` is printed as a single line naming the bad
input and the fix; anything else is a bug and keeps its traceback.
"""


# The exit code of a process that stopped on a ``UserError``: a restart would stop the same way, so
# the agent ends the job at once, and the chart's podFailurePolicy fails the Job.
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input (flag, config, checkpoint, storage) with a one-line message."""
