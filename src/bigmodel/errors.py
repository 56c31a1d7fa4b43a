"""The one exception type that means "the user asked for something that cannot work"."""


class UserError(Exception):
    """Bad input: a wrong config value, a missing file, an unusable checkpoint.

    Entry points print its message (which names the problem and the fix) without a traceback
    and exit with status 2.
    """
