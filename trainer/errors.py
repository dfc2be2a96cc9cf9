"""One exception type for mistakes a user can fix.

Everything raised as ``UserError`` is printed as a single line naming the bad
input and the fix; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input (flag, config, checkpoint, storage) with a one-line message."""
