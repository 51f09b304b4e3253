"""The ``cifarbench`` command: parses and renders; the library computes.

Each command lives in ``cifarbench/commands/<name>.py`` with a ``register(app)`` function. Heavy imports stay
inside the command bodies so ``--help`` and start-up stay fast.
"""
from __future__ import annotations

import importlib
import sys

import typer

from .errors import UserError

# Typer >= 0.20 vendors click; reach its exception classes through typer so both layouts work.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

COMMANDS = ("models", "train", "evaluate", "export", "verify", "bench", "occlude", "ablate", "mine", "sweep")

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train, compile and analyse the four CIFAR-10 nets of the report, fast.")

@app.callback()
def _root() -> None:
    """Train, compile and analyse the four CIFAR-10 nets of the report, fast."""


for _name in COMMANDS:
    importlib.import_module(f"cifarbench.commands.{_name}").register(app)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _terminated(signum, frame):
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so every ``finally`` runs and removes its
    # temporary files and folders instead of leaving them for the next run to sweep
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    command = typer.main.get_command(app)
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _terminated)
    else:
        previous = None
    try:
        code = command.main(args=argv, prog_name="cifarbench", standalone_mode=False)
    except UserError as exc:
        fail(str(exc))
    except OSError as exc:
        # every file-system failure (no space, read-only, permission, a file where a folder should be) is one
        # line naming the path, whichever library raised it
        from .io import describe_os_error

        fail(describe_os_error(exc))
    except _USAGE_ERROR as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        fail(f"{where}{exc.format_message()}")
    except _CLICK_EXCEPTION as exc:
        fail(exc.format_message())
    except typer.Abort:
        fail("aborted")
    except KeyboardInterrupt:
        fail("interrupted")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
