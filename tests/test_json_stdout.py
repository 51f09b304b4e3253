"""``--json``: stdout carries one JSON document and nothing else, even when the user's model prints in its forward
(a Python ``print`` in TorchScript or eager code, or a C-level write to file descriptor 1); what it prints goes to
stderr instead of being lost."""
from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch
from cli_helpers import run_cli
from PIL import Image
from torch import nn

from cifarbench.cli import main

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "cat.png")


class Chatty(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        print("chatty forward")
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_torchscript_print_goes_to_stderr_in_process(capsys, tmp_path):
    path = tmp_path / "chatty.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 calls scripting deprecated
        torch.jit.save(torch.jit.script(Chatty().eval()), str(path))
    code, out, err = run_cli(capsys, "occlude", "--model", path, "--k", "16", "--stride", "16", "--no-figures",
                             "--json", "--out", tmp_path / "o", EXAMPLE)
    assert code == 0, err
    doc = json.loads(out)  # the whole of stdout is the document
    assert doc["results"][0]["k"] == 16
    assert "chatty forward" in err and "chatty forward" not in out
    # stdout is given back after the command
    print("after")
    assert capsys.readouterr().out == "after\n"


FACTORY = '''
import os
from torch import nn

from cifarbench.cli import main

class Loud(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        print("python-level print")
        os.write(1, b"c-level write\\n")
        return self.fc(self.conv(x).relu().mean((2, 3)))

def loud():
    return Loud()
'''


def test_fd_level_writes_go_to_stderr_as_from_the_console_script(capfd, monkeypatch, tmp_path):
    """As the console script runs: ``sys.stdout`` is file descriptor 1 (here capfd's file), so a C-level write to
    it must be moved too, not only Python's ``sys.stdout``."""
    (tmp_path / "loud.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import loud

    torch.save(loud.loud().state_dict(), tmp_path / "w.pt")
    sys.modules.pop("loud", None)
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 20, 200 - 40 * i)).save(tmp_path / f"im{i}.png")
    fd1 = open(1, "w", closefd=False)
    monkeypatch.setattr(sys, "stdout", fd1)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["occlude", "--model", str(tmp_path / "w.pt"), "--arch", f"{tmp_path / 'loud.py'}:loud", "--k", "16",
              "--stride", "16", "--no-figures", "--json", "--out", str(tmp_path / "o"),
              *[str(tmp_path / f"im{i}.png") for i in range(3)]])
    assert sys.stdout is fd1  # given back
    fd1.flush()
    out, err = capfd.readouterr()
    assert exc.value.code == 0, err
    doc = json.loads(out)
    assert len(doc["results"]) == 3
    assert "python-level print" in err and "c-level write" in err
