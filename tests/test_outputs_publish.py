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


# ------------------------------------------------------------------------------------------------ figures
def _occ(map_, k, clean=0.9, target=3, predicted=3, stride=1):
    from cifarbench.analysis.occlusion import OcclusionResult

    return OcclusionResult(map=np.asarray(map_, np.float32), clean_prob=clean, target=target, predicted=predicted,
                           k=k, stride=stride, baseline=[0.5, 0.5, 0.5])


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (3, 32, 32), dtype=np.uint8)


def _png_title(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


def test_occlusion_figure_shares_one_perceptual_scale_and_names_model_and_true_label(tmp_path):
    from cifarbench.analysis.occlusion_plot import occlusion_figure, plot_occlusion

    small = _occ(np.linspace(0.2, 0.8, 25 * 25).reshape(25, 25), k=8)
    large = _occ(np.linspace(0.05, 0.6, 21 * 21).reshape(21, 21), k=12)
    fig = occlusion_figure(_image(), [small, large], "cat.png", model="net1", true_label="dog")
    title = fig._suptitle.get_text()
    assert "net1" in title and "true dog" in title and "cat.png" in title and "prediction" in title
    overlays = [ax.images[-1] for ax in fig.axes[1:3]]
    assert all(im.get_cmap().name == "viridis" for im in overlays)
    assert {im.get_clim() for im in overlays} == {(0.0, 0.9)}  # one scale: 0 to the clean probability
    assert all(len(ax.images) == 2 and 0 < ax.images[-1].get_alpha() < 1 for ax in fig.axes[1:3])  # image beneath
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "p(target)"
    import matplotlib.pyplot as plt

    plt.close(fig)
    own = occlusion_figure(_image(), [small, large], show="drop", shared_scale=False)
    overlays = [ax.images[-1] for ax in own.axes[1:3]]
    assert overlays[0].get_cmap().name == "magma" and overlays[0].get_clim() != overlays[1].get_clim()
    bars = [ax for ax in own.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and all(b.get_ylabel().startswith("drop in p") for b in bars)
    # drop = clean - occluded, exactly
    np.testing.assert_allclose(overlays[0].get_array(), 0.9 - small.map, rtol=0, atol=1e-6)
    plt.close(own)
    # the old call (positional title) still works, and the PNG carries its title
    path = plot_occlusion(_image(), [small], tmp_path / "a.png", "cat.png")
    assert "cat.png" in _png_title(path)["Title"]


def test_occlusion_grid_is_one_figure_for_many_images(tmp_path):
    from cifarbench.analysis.occlusion_plot import occlusion_grid_figure, plot_occlusion_grid

    items = [(_image(i), _occ(np.full((25, 25), 0.1 * (i + 1)), k=8, predicted=i % 10, target=i % 10),
              "cat" if i != 2 else None, f"test[{i}]") for i in range(7)]
    fig = occlusion_grid_figure(items, model="net4", columns=3)
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 7 and {ax.images[-1].get_clim() for ax in maps} == {(0.0, 0.9)}
    assert "net4" in fig._suptitle.get_text() and "K=8" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in maps]
    assert "true cat" in titles[3] and "pred cat" in titles[3] and "true" not in titles[2]
    assert maps[0].title.get_color() == "tab:red" and maps[3].title.get_color() == "black"  # airplane vs cat
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert plot_occlusion_grid(items, tmp_path / "grid.png").stat().st_size > 0


def test_ablation_figures_name_the_filters_and_have_colorbars(tmp_path):
    from cifarbench.analysis.figures import change_text, confusion_fig, confusion_figure, flipped_grid

    classes = ["airplane", "automobile", "bird"]
    before, after = np.array([[5, 1, 0], [0, 6, 0], [1, 0, 4]]), np.array([[4, 2, 0], [0, 6, 0], [3, 0, 2]])
    filters = [{"layer": "conv1", "filter": 0}, {"layer": "conv1", "filter": 1}, {"layer": "conv2", "filter": 5}]
    fig = confusion_fig(before, after, classes, filters=filters, title="net1")
    assert "conv1:0,1 conv2:5" in fig._suptitle.get_text() and "net1" in fig._suptitle.get_text()
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 and len(fig.axes) == 6  # a colorbar per panel
    assert [ax.get_ylabel() for ax in panels] == ["true", "", ""]  # no "true" over panel 1's class names
    assert panels[2].images[0].get_clim() == (-2, 2) and panels[2].get_title() == "after − before"
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert "conv2:5" in _png_title(confusion_figure(before, after, classes, tmp_path / "c.png",
                                                    filters=filters))["Title"]
    path = flipped_grid([_image()], [{"index": 3, "label": "cat", "before": "cat", "after": "dog"}],
                        tmp_path / "flipped.png", filters=filters)
    assert "conv1:0,1" in _png_title(path)["Title"] and "right before and wrong after" in _png_title(path)["Title"]
    assert change_text({"class": "bird", "change": 0.0}) == "none"
    assert change_text({"class": "bird", "change": 0.012}) == "bird +1.20"
    assert change_text({"class": "cat", "change": -0.05}, kind="loss") == "cat -5.00"
    assert change_text({"class": "cat", "change": 0.0}, kind="loss") == "none"


def test_mining_patches_share_one_scale_and_negative_filters_are_flagged():
    from cifarbench.analysis.figures import mining_fig

    top = [{"index": 1, "label": "cat", "response": -2.0, "patch": [0, 0, 5, 7]},   # clipped at the top border
           {"index": 2, "label": "dog", "response": -3.0, "patch": [10, 10, 17, 17]}]
    fig = mining_fig([_image(1), _image(2)], {"layer": "conv3", "filter": 4, "top": top}, receptive_field=7)
    patches = fig.axes[len(top):]  # second row
    assert [ax.get_xlim() for ax in patches] == [(-0.5, 6.5)] * 2  # one 7x7 window each
    (l0, r0, b0, t0), (l1, r1, b1, t1) = (ax.images[0].get_extent() for ax in patches)
    assert (r0 - l0, b0 - t0) == (7, 5) and (r1 - l1, b1 - t1) == (7, 7)  # a pixel is a pixel in both
    assert t0 == 1.5  # the two missing rows are above the clipped patch (it touched the top border)
    assert "negative" in fig._suptitle.get_text() and "conv3 filter 4" in fig._suptitle.get_text()
    note = fig.texts[-1].get_text()
    assert "spatial sum" in note and "argmax" in note
    import matplotlib.pyplot as plt

    plt.close(fig)
    top[0]["response"] = 1.0
    fig = mining_fig([_image(1), _image(2)], {"layer": "conv3", "filter": 4, "top": top})
    assert "negative" not in fig._suptitle.get_text()
    plt.close(fig)


def test_sweep_plots_draw_bars_or_points_for_few_epochs_with_titles(tmp_path):
    from matplotlib.image import imread

    from cifarbench.sweep_plots import percent, plot_curves, plot_grouped

    one = [{"name": f"run{i}", "epoch": 1, "test_accuracy": 0.1 * (i + 1)} for i in range(3)]
    plot_curves(one, tmp_path / "one.png")
    assert _png_title(tmp_path / "one.png")["Title"] == "test accuracy of 3 runs"
    three = [{"name": f"run{i}", "epoch": e, "test_accuracy": 0.1 * e} for i in range(2) for e in (1, 2, 3)]
    plot_curves(three, tmp_path / "three.png", title="net1 grid")
    assert _png_title(tmp_path / "three.png")["Title"].startswith("net1 grid")
    plot_grouped([{"epoch": 1, "train_accuracy": 0.3, "test_accuracy": 0.25}], ["epoch"], tmp_path / "g.png")
    assert imread(tmp_path / "g.png").shape[0] > 100
    assert percent(0.1142) == "11.4" and percent(-0.13785999) == "-13.8" and percent(None) == ""


def test_sweep_curves_for_one_epoch_are_bars():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cifarbench import sweep_plots

    rows = [{"name": f"run{i}", "epoch": 1, "test_accuracy": 0.1 * (i + 1)} for i in range(3)]
    before = set(plt.get_fignums())
    saved = []
    orig = sweep_plots._save
    try:  # capture the figure that plot_curves saves (the saving, not the drawing, is replaced)
        sweep_plots._save = lambda fig, path, caption=None: saved.append(fig)
        sweep_plots.plot_curves(rows, "unused.png")
    finally:
        sweep_plots._save = orig
    (fig,) = saved
    ax = fig.axes[0]
    assert len(ax.patches) == 3 and [round(p.get_height(), 6) for p in ax.patches] == [0.1, 0.2, 0.3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["run0", "run1", "run2"]
    plt.close(fig)
    assert set(plt.get_fignums()) == before


# ------------------------------------------------------------------------------------------------ offline defaults
def test_default_data_comes_from_the_environment(monkeypatch):
    from cifarbench.data import data_settings, default_data

    monkeypatch.delenv("CIFARBENCH_DATA", raising=False)
    assert default_data() == "cifar10" and data_settings()["data_from"] == "built-in default"
    monkeypatch.setenv("CIFARBENCH_DATA", "  ")
    assert default_data() == "cifar10"
    monkeypatch.setenv("CIFARBENCH_DATA", "/data/cifar10-jpeg75.tar.gz")
    assert default_data() == "/data/cifar10-jpeg75.tar.gz"
    assert data_settings()["data_from"] == "$CIFARBENCH_DATA"


def test_a_failed_download_names_data_path_and_the_setting(monkeypatch, tmp_path):
    import torchvision.datasets

    from cifarbench.data import load_split
    from cifarbench.errors import UserError

    class Offline:  # torchvision's CIFAR10 on a machine without network: not there, and the download fails
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("Dataset not found") if not download else OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(UserError) as exc:
        load_split("cifar10", "test", data_dir=tmp_path)
    assert "--data PATH" in str(exc.value) and "CIFARBENCH_DATA" in str(exc.value) and "\n" not in str(exc.value)


def test_bundled_calibration_set_is_class_balanced_uint8_and_matches_its_provenance():
    from cifarbench.data import CLASSES, _calibration_paths, bundled_calibration

    ds = bundled_calibration()
    npz, meta_path = _calibration_paths()
    meta = json.loads(meta_path.read_text())
    assert ds.images.dtype.is_floating_point is False and str(ds.images.dtype) == "torch.uint8"
    assert tuple(ds.images.shape) == (250, 3, 32, 32) and ds.classes == CLASSES
    assert np.bincount(ds.labels.numpy(), minlength=10).tolist() == [25] * 10
    assert hashlib.sha256(npz.read_bytes()).hexdigest() == meta["sha256"]
    assert hashlib.sha256(ds.images.numpy().tobytes()).hexdigest() == meta["images_sha256"]
    members = meta["selection"]["members"]
    assert len(members) == 250 and all(m.lstrip("./").startswith("train/") for m in members)
    assert [m.split("/")[-2] for m in members] == [CLASSES[i] for i in ds.labels.tolist()]
    assert meta["source"]["split"] == "train" and "license" in meta
    # a model with its classes in another order gets labels by name
    flipped = bundled_calibration(classes=CLASSES[::-1])
    assert (flipped.labels == 9 - ds.labels).all()


def test_bundled_calibration_images_are_the_archive_members_decoded():
    archive = REPO.parent / "shared" / "data" / "cifar10-jpeg75.tar.gz"
    if not archive.is_file():
        pytest.skip("../shared/data is absent")
    import tarfile

    from PIL import Image

    from cifarbench.data import _calibration_paths, bundled_calibration

    meta = json.loads(_calibration_paths()[1].read_text())
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == meta["source"]["sha256"]
    ds = bundled_calibration()
    want = {m: i for i, m in enumerate(meta["selection"]["members"]) if i % 25 == 0}  # one per class
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.name in want:
                pixels = np.asarray(Image.open(tar.extractfile(m)).convert("RGB")).transpose(2, 0, 1)
                assert (ds.images[want.pop(m.name)].numpy() == pixels).all(), m.name
    assert not want


def test_a_damaged_calibration_file_is_one_error(monkeypatch, tmp_path):
    import shutil

    from cifarbench import data
    from cifarbench.errors import UserError

    npz, meta = data._calibration_paths()
    bad_npz, bad_meta = tmp_path / npz.name, tmp_path / meta.name
    shutil.copy(meta, bad_meta)
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad_npz.write_bytes(bytes(blob))
    monkeypatch.setattr(data, "_calibration_paths", lambda: (bad_npz, bad_meta))
    with pytest.raises(UserError, match="sha256.*--calib-data PATH"):
        data.bundled_calibration()
    bad_npz.unlink()
    with pytest.raises(UserError, match="missing.*--calib-data PATH"):
        data.bundled_calibration()


# ------------------------------------------------------------------------------------------------ whole tables
_TABLE = """
from rich.table import Table
from cifarbench.console import console
t = Table(title="wide")
for i in range(9):
    t.add_column(f"images per second {i}")
t.add_row(*[f"GFLOP/s value {i}" for i in range(9)])
console.print(t)
"""


def test_tables_written_to_a_file_are_whole(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    with open(tmp_path / "report.txt", "w") as f:
        subprocess.run([sys.executable, "-c", _TABLE], stderr=f, cwd=REPO, env=env, check=True, timeout=120)
    text = (tmp_path / "report.txt").read_text()
    assert "…" not in text
    assert all(f"images per second {i}" in text and f"GFLOP/s value {i}" in text for i in range(9))
    assert max(len(line) for line in text.splitlines()) > 120
