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


def error_reason(exc: BaseException, limit: int = 300) -> str:
    """The line of ``exc``'s message that says what went wrong: its first, except for TorchScript's errors,
    which put a preamble and the scripted traceback first and the model's own error last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0])[:limit]
