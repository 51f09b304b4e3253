"""The ``cifarbench`` command: parses and renders; the library computes.

Each command lives in ``cifarbench/commands/<module>.py`` with a ``register(app)`` function. A command's module
is imported only when that command runs (or its own ``--help`` is asked for): ``cifarbench --help``,
``-h`` and ``--version`` import neither torch nor numpy, so they answer at once. The one-line help of each
command for the root listing is kept here, in :data:`SHORT_HELP`, for that reason.
"""
from __future__ import annotations

import importlib
import sys

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import UserError

# Typer >= 0.20 vendors click; reach its exception classes through typer so both layouts work.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


#: the modules under cifarbench/commands/, in the order the root help lists their commands
COMMANDS = ("models", "train", "evaluate", "export", "verify", "bench", "occlude", "ablate", "mine", "layers", "sweep")
#: command name -> module, where they differ (``eval`` lives in evaluate.py: ``eval`` is a Python builtin)
MODULE_OF = {"eval": "evaluate"}
#: the root listing's one line per command (kept here so listing them imports none of them)
SHORT_HELP = {
    "models": "List the zoo nets: parameters, FLOPs, bundled weights and accuracy.",
    "train": "Train a net (seed or fast recipe); metrics.csv and best/last checkpoints.",
    "eval": "Test accuracy, per-class accuracy and confusion matrix of a model.",
    "export": "Export a model to ONNX, INT8 ONNX, AOTInductor or TensorRT.",
    "verify": "Parity of every backend against a reference (logits, probabilities, top-1).",
    "bench": "Throughput and latency per backend; render (--from) and compare saved runs.",
    "occlude": "Occlusion maps of images or a dataset slice (NPY, CSV, PNG, JSON).",
    "ablate": "Zero filters: per-class accuracy and confusion before and after.",
    "mine": "Top images and receptive-field patches that excite each filter.",
    "sweep": "Train every point of a hyper-parameter grid; grouped tables and plots.",
    "layers": "List a model's conv layers with filter counts and receptive fields.",
}


def _version() -> str:
    # importlib.metadata, not ``cifarbench.__version__``, would also work for an installed copy; the package's
    # own string is the one source of truth for a source checkout too
    from . import __version__

    return __version__


def _command_names() -> list[str]:
    inverse = {module: name for name, module in MODULE_OF.items()}
    return [inverse.get(module, module) for module in COMMANDS]


def _tidy_help(cmd, ctx) -> None:
    """Help that reads like a man page: arguments as ``MODEL`` (not ``{model}``), flags without a ``<bool>``
    type. Set on the parameters themselves, so usage lines and error messages say the same."""
    for param in cmd.get_params(ctx):
        if param.metavar is not None:
            continue
        if getattr(param, "param_type_name", "") == "argument":
            param.metavar = (param.name or "").upper()
            if hasattr(param, "_usage_display_name"):
                # typer writes a required argument as {model} in the usage line; man pages write MODEL
                param._usage_display_name = _usage_name(param)
        elif getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False):
            param.metavar = ""


def _usage_name(param):
    def name() -> str:
        text = param.metavar if param.required else f"[{param.metavar}]"
        return text + ("..." if param.nargs != 1 else "")

    return name


class LazyGroup(TyperGroup):
    """A typer group whose commands are imported on first use.

    Commands added the ordinary way (``@app.command``) are served as usual; the names in :data:`COMMANDS` are
    imported from ``cifarbench.commands`` when the command runs. While the root help is being drawn, a lazy
    command is a stand-in carrying only its one line of help, so the listing imports nothing."""

    _listing = False

    def list_commands(self, ctx) -> list[str]:
        names = _command_names()
        return names + [n for n in super().list_commands(ctx) if n not in names]

    def get_command(self, ctx, cmd_name: str):
        cmd = self.commands.get(cmd_name)
        if cmd is not None:
            return cmd
        if cmd_name not in _command_names():
            return None
        if self._listing and cmd_name in SHORT_HELP:
            return TyperCommand(cmd_name, help=SHORT_HELP[cmd_name], short_help=SHORT_HELP[cmd_name])
        module = importlib.import_module(f"cifarbench.commands.{MODULE_OF.get(cmd_name, cmd_name)}")
        sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        module.register(sub)
        group = typer.main.get_command(sub)
        cmd = group if not isinstance(group, TyperGroup) else group.get_command(ctx, cmd_name)
        if cmd is not None:
            _tidy_help(cmd, ctx)
            self.commands[cmd_name] = cmd
        return cmd

    def format_help(self, ctx, formatter) -> None:
        _tidy_help(self, ctx)
        self._listing = True
        try:
            return super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(cls=LazyGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Train, compile and analyse the four CIFAR-10 nets of the report, fast.\n\n"
                       "Examples: cifarbench occlude --k 8 examples/cat.png --out occlusion;  "
                       "cifarbench eval net4 --data PATH;  cifarbench COMMAND -h")


def _print_version(value: bool) -> None:
    if value:
        print(f"cifarbench {_version()}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train, compile and analyse the four CIFAR-10 nets of the report, fast."""


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


#: the command line of the running ``main`` call, as ["cifarbench", ...] (None outside one)
COMMAND_LINE: list[str] | None = None


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    global COMMAND_LINE
    # what provenance records: the arguments this call got (in-process callers pass argv; the console script
    # has them in sys.argv)
    COMMAND_LINE = ["cifarbench", *(sys.argv[1:] if argv is None else [str(a) for a in argv])]
    from .console import json_stdout, quiet_cuda_probe

    quiet_cuda_probe()  # every command that may compile (aoti, torch-compile) on a CUDA build without a GPU
    command = typer.main.get_command(app)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _interrupted)
    _signals.clear()
    try:
        # with --json, stdout carries the one JSON document and nothing else, whatever the model prints
        with json_stdout("--json" in COMMAND_LINE[1:]):
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
