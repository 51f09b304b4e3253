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


_signals: list[int] = []  # the signals that interrupted this run


def _interrupted(signum, frame):
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so every ``finally`` runs and removes its
    # temporary files and folders instead of leaving them for the next run to sweep; typer turns the
    # KeyboardInterrupt into a silent exit 130, so the signal is noted here for the one ``error:`` line
    _signals.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    command = typer.main.get_command(app)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _interrupted)
    _signals.clear()
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
        _signals.append(signal.SIGINT)
        code = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if _signals:
        print("error: interrupted", file=sys.stderr)
        sys.exit(128 + _signals[0])  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
