"""The one exception type that means "the user asked for something wrong", and the one way to warn.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; everything else is a bug and
keeps its traceback. :func:`warn` is the matching single ``warning:`` line for things that are allowed but the
user should know (a missing class, a damaged cache that was rebuilt).
"""
from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake in the user's input: bad file, unknown name, value out of range."""


def warn(message: str) -> None:
    """Print ``warning: <message>`` as one line on stderr (newlines in ``message`` become spaces)."""
    text = " ".join(str(message).split("\n"))
    print(f"warning: {text}", file=sys.stderr, flush=True)
