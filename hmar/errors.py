"""The one exception type for bad user input.

Anything a user can get wrong (a missing file, a class id out of range, a schedule that does not
fit the scales) raises :class:`HMARError` with a message that names the bad value and the fix.
The CLI prints it as a single ``error: ...`` line and exits with status 2: no traceback.
"""


class HMARError(ValueError):
    """Bad input: the message says what was wrong and how to fix it."""
