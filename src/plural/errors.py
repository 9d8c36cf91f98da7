"""One exception type for every error a user can fix.

The CLI catches `PluralError`, prints its message (which names the file, line, field or key
and the fix) and exits non-zero without a traceback.
"""


class PluralError(Exception):
    """An error caused by input or state the user controls; the message says what and where."""
