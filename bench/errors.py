"""The one exception type for a user's mistake."""


class UserError(Exception):
    """A mistake the user can mend (missing file, unknown name, bad value).

    The CLI prints its message as one line and exits with code 2, without a traceback.
    The message says what is wrong and how to mend it.
    """
