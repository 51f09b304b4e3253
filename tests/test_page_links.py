"""Every figure an index.html shows is a link that resolves, from the page's folder, to the file cifarbench wrote:
with a relative --out (the usual use) and with image names that hold URL characters ("#", "?", "%")."""
from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import numpy as np
from cli_helpers import run_cli
from PIL import Image


def links(page: Path) -> list[Path]:
    srcs = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert srcs, "the page shows no figure"
    return [page.parent / urllib.parse.unquote(s) for s in srcs if not s.startswith("data:")]


def test_pages_link_their_figures_with_a_relative_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "eval", "net1", "--data", "synthetic:40", "--out", "ev")
    assert code == 0, err
    code, _, err = run_cli(capsys, "ablate", "net1", "--filters", "conv1:0,1", "--data", "synthetic:40", "--out",
                           "ab")
    assert code == 0, err
    for page in (Path("ev/index.html"), Path("ab/index.html")):
        targets = links(page)
        assert targets and all(t.is_file() for t in targets), (page, targets)


def test_figure_links_are_urls(tmp_path, capsys):
    names = ["a#1.png", "b%41c.png", "q?x.png"]
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name in names:
        Image.fromarray(pixels).save(tmp_path / name)
    code, _, err = run_cli(capsys, "occlude", "--k", "16", "--stride", "16", *[tmp_path / n for n in names],
                           "--out", tmp_path / "o")
    assert code == 0, err
    targets = links(tmp_path / "o" / "index.html")
    assert len(targets) >= 3 and all(t.is_file() for t in targets), targets
