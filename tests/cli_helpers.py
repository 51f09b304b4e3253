"""Run the CLI in-process (start-up of a subprocess costs seconds on this CPU) and capture what it prints."""
from __future__ import annotations

import pytest

from cifarbench.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``cifarbench *args``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_user_error(capsys, *args: str, match: str = "") -> str:
    """The command fails with exit 2 and exactly one ``error:`` line, no traceback."""
    code, out, err = run_cli(capsys, *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]
