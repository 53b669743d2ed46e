"""The one exception type for mistakes a user can make.

A ``UserError`` is caught by the command line, printed as one line
(``error: <what was wrong>; <how to mend it>``) and turned into exit code 2.
Anything else is our bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad setting, a missing file, a cache that does not match: the user can fix it."""

    exit_code = 2
