"""CLI polish (issue 15): every command's help shows examples using only options it has; the eval table's title
names the data in words, so it wraps between words rather than inside the identity string."""
from __future__ import annotations

import pytest

from cli_helpers import run_cli


@pytest.mark.parametrize("command", ["models", "train", "eval", "export", "verify", "bench", "occlude", "ablate",
                                     "mine", "layers", "sweep"])
def test_every_command_help_has_examples_that_parse(command, capsys):
    """Each command's help shows examples, and every option an example uses is one of the command's own options
    (read from the click command, not from the help text)."""
    import re

    import typer

    from cifarbench.cli import app

    code, out, err = run_cli(capsys, command, "-h")
    assert code == 0, err
    text = " ".join(out.split())
    assert "Examples: cifarbench" in text, command
    examples = re.findall(rf"cifarbench {command}\b[^;]*", text.split("Examples:", 1)[1].split("╭", 1)[0])
    assert examples
    import click

    group = typer.main.get_command(app)
    click_command = group.get_command(click.Context(group), command)
    options = {o for p in click_command.params for o in (*p.opts, *p.secondary_opts)}
    for ex in examples:
        used = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w-])", ex)
        assert used or command in ("models", "layers"), ex
        for option in used:
            assert option in options, (command, option)


def test_eval_title_wraps_between_words(capsys, monkeypatch):
    from cifarbench.provenance import data_label

    assert data_label("imagefolder:cifar10-jpeg75.tar.gz:3dfec3500d918393:test") == \
        "cifar10-jpeg75.tar.gz test (3dfec350)"
    assert data_label("synthetic:200:test") == "synthetic:200 test"
    monkeypatch.setenv("COLUMNS", "40")
    code, _, err = run_cli(capsys, "eval", "net1", "--data", "synthetic:300", "--backend", "torch", "--device", "cpu")
    assert code == 0, err
    title = []
    for line in err.splitlines():
        if "┏" in line:
            break
        title += line.split()
    joined = " ".join(title)
    assert joined.startswith("net1 on synthetic:300 test, ") and joined.endswith(" images (torch)"), err
    assert all(word in ("net1", "on", "synthetic:300", "test,", "images", "(torch)") or
               word.replace(",", "").isdigit() for word in title), title   # every word whole, none cut


@pytest.mark.parametrize("args", [["models"], ["layers", "net1"]])
def test_listing_commands_json_carries_provenance(args, capsys):
    import json

    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    prov = json.loads(out)["provenance"]
    assert prov["command"] == "cifarbench " + " ".join([*args, "--json"]) and prov["cifarbench"] and prov["date"]
    if args[0] == "layers":
        assert prov["model"]["name"] == "net1" and prov["model"]["digest"]
