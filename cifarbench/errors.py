"""The one exception type that means "the user asked for something wrong".

The CLI turns it into a single line on stderr and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: bad file, unknown name, value out of range."""
