"""What a person reads from a sweep: figure titles (one each: model, what is drawn, data), the caption, distinct
percent ticks and labelled bars, the terminal tables and grouped CSVs rounded by one rule, and an index.html whose
every figure exists and every number equals the JSON. One real tiny sweep through the CLI (a few seconds)."""
from __future__ import annotations

import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

GRID = ("--grid", "l1_oc=8,16", "--grid", "kernel_size=3,5")
ARGS = ("net1", *GRID, "--epochs", "1", "--data", "synthetic:200")


# ------------------------------------------------------------------------------------------------ helpers
class Page(HTMLParser):
    """index.html as data: its images, and its tables under their h2 headings (headers, and each cell as
    ``(data-value or None, text)``)."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.text = [], [], []
        self.result = None
        self._heading = self._cell = self._script = None
        self._h2 = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "h2":
            self._heading = []
        elif tag == "table":
            self.tables.append({"title": self._h2, "columns": [], "rows": []})
        elif tag == "tr" and self.tables:
            self._row = []
        elif tag in ("th", "td"):
            self._cell = [a.get("data-value"), ""]
        elif tag == "script" and a.get("type") == "application/json":
            self._script = []

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)
        if self._cell is not None:
            self._cell[1] += data
        if self._script is not None:
            self._script.append(data)

    def handle_endtag(self, tag):
        if tag == "h2":
            self._h2, self._heading = "".join(self._heading), None
        elif tag == "th":
            self.tables[-1]["columns"].append(self._cell[1])
            self._cell = None
        elif tag == "td":
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "tr" and self._row:
            self.tables[-1]["rows"].append(self._row)
            self._row = []
        elif tag == "script" and self._script is not None:
            self.result = json.loads("".join(self._script))
            self._script = None


def read_page(folder: Path) -> Page:
    """``folder/index.html`` parsed; every image it shows is a relative path to a file that exists."""
    page = Page()
    page.feed((folder / "index.html").read_text())
    for src in page.images:
        assert not src.startswith(("data:", "/", "file:")) and ".." not in Path(src).parts, src
        assert (folder / src).is_file(), src
    return page


def check_cells(table: dict, want_rows: list[list]) -> None:
    """Every numeric cell's exact ``data-value`` equals the wanted number (None: a text cell, compared as text),
    and the text shown is that number rounded (never ``-0``)."""
    from cifarbench.report_html import format_number

    assert len(table["rows"]) == len(want_rows), table["title"]
    for row, want in zip(table["rows"], want_rows):
        assert len(row) == len(want), (table["title"], row)
        for (value, text), expect in zip(row, want):
            if isinstance(expect, (int, float)) and not isinstance(expect, bool):
                assert value is not None, (table["title"], text, expect)
                assert json.loads(value) == expect, (table["title"], value, expect)
                assert text == format_number(expect) and not re.match(r"-0(\.0*)?$", text), (text, expect)
            else:
                assert value is None and text == ("" if expect is None else str(expect)), (text, expect)


def _png_text(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


def repeated_phrase(title: str, n: int = 3) -> str | None:
    """The first run of ``n`` words that occurs twice in ``title`` (punctuation ignored), else None."""
    words = re.findall(r"[\w:%.]+", title.lower())
    seen = set()
    for i in range(len(words) - n + 1):
        gram = " ".join(words[i:i + n])
        if gram in seen:
            return gram
        seen.add(gram)
    return None


def pct(fraction):
    return None if fraction is None else round(100 * fraction, 2) + 0.0


def whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


# ------------------------------------------------------------------------------------------------ the sweep
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One real sweep, in-process, shared by the tests here (cli_helpers.run_cli needs capsys, which a module
    fixture cannot have: stdout and stderr are redirected the same way by hand)."""
    import contextlib

    from cifarbench.cli import main

    out = tmp_path_factory.mktemp("sweep-outputs") / "s"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exc:
        main(["sweep", *ARGS, "--out", str(out), "--json"])
    assert exc.value.code == 0, stderr.getvalue()
    return out, json.loads(stdout.getvalue())


def test_figure_titles_say_once_the_model_what_is_drawn_and_the_data(sweep):
    out, result = sweep
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"test_accuracy.png", "grouped_l1_oc.png", "grouped_kernel_size.png",
                                      "grouped_l1_oc__kernel_size.png", "grouped_epoch.png"}
    for png in pngs:
        meta = _png_text(png)
        title = meta["Title"]
        assert title.startswith("net1") and "synthetic:200" in title, title
        assert repeated_phrase(title) is None, (png.name, repeated_phrase(title), title)
        assert title.count("net1") == 1 and title.count("synthetic:200") == 1, title
        # the caption: the grid as typed, not a Python list
        assert "['" not in meta["Description"] and "[" not in meta["Description"].split("grid", 1)[1]
        assert meta["Description"].endswith("grid l1_oc=8,16 kernel_size=3,5"), meta["Description"]
    curves = _png_text(out / "plots" / "test_accuracy.png")["Title"]
    assert "line" not in curves and "4 runs" in curves  # one epoch: bars, one per run
    assert "l1_oc × kernel_size" in _png_text(out / "plots" / "grouped_l1_oc__kernel_size.png")["Title"]


def test_index_html_shows_existing_figures_and_the_jsons_numbers(sweep):
    out, result = sweep
    page = read_page(out)
    assert sorted(page.images) == sorted(f"plots/{p.name}" for p in (out / "plots").glob("*.png"))
    on_disk = json.loads((out / "summary.json").read_text())
    assert page.result == {k: v for k, v in result.items() if k != "files"}
    assert {k: v for k, v in on_disk.items() if k != "files"} == page.result
    assert "-0.00" not in "".join(page.text)

    tables = {t["title"]: t for t in page.tables}
    metrics = ["loss", "train acc %", "test acc %", "overfit %", "parameters"]

    def metric_values(r):
        return [r["loss"], pct(r["train_accuracy"]), pct(r["test_accuracy"]), round(r["overfit%"], 2) + 0.0,
                whole(r["total_parameters"])]

    best = result["best"]
    t = tables["Best run and epoch (by test accuracy)"]
    assert t["columns"] == ["run", "grid point", "epoch", *metrics]
    check_cells(t, [[best["run"], best["name"], best["epoch"], *metric_values(best)]])
    assert len(result["grouped"]) == 4
    for group in result["grouped"]:
        t = tables[f"Mean over all epochs of all runs, by {' × '.join(group['by'])}"]
        assert t["columns"] == [*group["by"], "runs", *metrics]
        check_cells(t, [[*(r[k] for k in group["by"]), r["runs"], *metric_values(r)] for r in group["rows"]])
    t = tables["Runs"]
    assert t["columns"] == ["run", "grid point", "status", "best epoch", "best test acc %", "final test acc %",
                            "parameters", "train s", "error"]
    check_cells(t, [[r["run"], r["name"], r["status"], r["best_epoch"], pct(r["best_test_accuracy"]),
                     pct(r["final_test_accuracy"]), r["total_parameters"], r["train_seconds"], r["error"]]
                    for r in result["runs"]])
    # a percent on the page has at most 2 decimals
    for t in page.tables:
        for j, col in enumerate(t["columns"]):
            if col.endswith("%"):
                assert all(re.fullmatch(r"-?\d+(\.\d{1,2})?", row[j][1]) for row in t["rows"]), (col, t["rows"])


def test_grouped_csvs_are_rounded_for_a_reader_and_metrics_csv_stays_raw(sweep):
    from cifarbench.train import metric_columns
    from cifarbench.zoo import HPARAMS

    out, result = sweep
    for group in result["grouped"]:
        path = out / "grouped" / f"{'__'.join(group['by'])}.csv"
        text = path.read_text()
        assert "e-" not in text and "-0," not in text and not re.search(r"\d\.0(,|$)", text, re.M), text
        rows = list(csv.DictReader(io.StringIO(text)))
        for line, r in zip(rows, group["rows"]):
            assert int(line["total_parameters"]) == round(r["total_parameters"])
            for m in ("loss", "train_accuracy", "test_accuracy"):
                assert float(line[m]) == pytest.approx(r[m], rel=1e-5)
                assert len(line[m].replace("-", "").replace(".", "").lstrip("0")) <= 6, line[m]
            assert float(line["overfit%"]) == pytest.approx(r["overfit%"], abs=1e-4)
    with open(out / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == metric_columns({k: None for k in HPARAMS}) + ["name"]
        raw = list(reader)
    # the raw per-epoch rows keep full precision: the loss (a mean over images) is not cut to 6 digits, and the
    # accuracies are exact fractions of the test set (correct / images)
    assert any(len(r["loss"].replace(".", "").lstrip("0")) > 6 for r in raw), [r["loss"] for r in raw]
    from cifarbench.data import load_split

    test_images = len(load_split(ARGS[ARGS.index("--data") + 1], "test"))
    for r in raw:
        correct = float(r["test_accuracy"]) * test_images
        assert correct == pytest.approx(round(correct), abs=1e-9), r["test_accuracy"]


def test_terminal_tables_use_one_header_style_and_no_negative_zero(sweep, capsys):
    from rich.console import Console

    from cifarbench.commands.sweep import render_summary

    out, result = sweep
    summary = json.loads(json.dumps(result))
    # a float32 test accuracy a hair above the double train accuracy: overfit% -1.49e-07, once "-0.00"
    summary["grouped"][0]["rows"][0]["overfit%"] = -1.4901161138336505e-07
    summary["best"]["overfit%"] = -1.4901161138336505e-07
    capsys.readouterr()
    render_summary(summary, Console(file=io.StringIO()))
    text = capsys.readouterr().err
    assert "-0.00" not in text and "overfit%" not in text and "_accuracy" not in text, text
    heads = [[c.strip() for c in line.strip("┃").split("┃")] for line in text.splitlines() if line.startswith("┃")]
    assert len(heads) == len(result["grouped"])
    for cols, group in zip(heads, result["grouped"]):
        assert cols == [*group["by"], "runs", "loss", "train acc %", "test acc %", "overfit %", "parameters"]
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == sum(len(g["rows"]) for g in result["grouped"])
    for row in rows:  # percents with 2 decimals, parameters whole
        assert all(re.fullmatch(r"-?\d+\.\d\d", c) for c in row[-4:-1]), row
        assert re.fullmatch(r"\d{1,3}(,\d{3})*", row[-1]), row
    first = result["grouped"][0]["rows"][0]
    assert f"{round(100 * first['test_accuracy'], 2):.2f}" in rows[0]


# ------------------------------------------------------------------------------------------------ the figures
def _drawn(fn, *args):
    """The figure a sweep_plots function saves (its saving replaced), drawn, so its tick labels exist."""
    from cifarbench import sweep_plots

    saved = []
    orig = sweep_plots._save
    try:
        sweep_plots._save = lambda fig, path, caption=None: saved.append(fig)
        fn(*args, "unused.png")
    finally:
        sweep_plots._save = orig
    (fig,) = saved
    fig.canvas.draw()
    return fig


def test_percent_ticks_are_distinct_when_values_are_close():
    import matplotlib.pyplot as plt

    from cifarbench.sweep_plots import plot_grouped, tick_decimals

    assert tick_decimals([0.11, 0.1125, 0.115]) == 2 and tick_decimals([0.1, 0.2]) == 0
    assert tick_decimals([0.108, 0.11, 0.112]) == 1
    for a, b in ((0.1125, 0.11250000260770321), (0.112, 0.1135), (0.41, 0.4102)):
        fig = _drawn(plot_grouped, [{"epoch": 1, "runs": 4, "train_accuracy": a, "test_accuracy": b}], ["epoch"])
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels() if ax.get_ylim()[0] <= t.get_position()[1]
                  <= ax.get_ylim()[1]]
        assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
        assert all(s.endswith("%") and not s.startswith("-0") for s in labels), labels
        assert ax.get_ylim()[1] - ax.get_ylim()[0] >= 0.0099  # float32 noise is not stretched over the axis
        plt.close(fig)


def test_bar_labels_carry_the_unit_and_titles_say_what_is_drawn():
    import matplotlib.pyplot as plt

    from cifarbench.sweep_plots import FEW_EPOCHS, plot_curves, plot_grouped

    one = [{"name": f"run{i}", "epoch": 1, "test_accuracy": 0.15 - 0.05 * i} for i in range(3)]
    fig = _drawn(plot_curves, one)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["15.00%", "10.00%", "5.00%"], labels
    assert "line" not in fig.axes[0].get_title()
    plt.close(fig)
    few = [{"name": f"run{i}", "epoch": e, "test_accuracy": 0.1 * e} for i in range(2) for e in (1, 2)]
    fig = _drawn(plot_curves, few)
    assert "line" not in fig.axes[0].get_title() and "epochs 1, 2" in fig.axes[0].get_title()
    plt.close(fig)
    many = [{"name": f"run{i}", "epoch": e, "test_accuracy": 0.01 * e} for i in range(2)
            for e in range(1, FEW_EPOCHS + 3)]
    fig = _drawn(plot_curves, many)
    assert "one line per run" in fig.axes[0].get_title()
    plt.close(fig)
    table = [{"l1_oc": v, "runs": 1, "train_accuracy": 0.2, "test_accuracy": 0.15} for v in (8, 16)]
    fig = _drawn(plot_grouped, table, ["l1_oc"])
    assert {t.get_text() for t in fig.axes[0].texts} == {"20.00%", "15.00%"}
    plt.close(fig)


def test_the_grid_caption_and_csv_numbers_are_written_as_typed():
    from cifarbench.sweep import grid_text, tidy_number

    assert grid_text({"l1_oc": ["8", "16"], "kernel_size": [3, 5]}) == "l1_oc=8,16 kernel_size=3,5"
    assert tidy_number(72302.0, "total_parameters") == 72302 and isinstance(tidy_number(72302.0), int)
    assert tidy_number(-1.4901161138336505e-07, "overfit%") == 0 and str(tidy_number(-1e-9, "overfit%")) == "0"
    assert tidy_number(0.10000000149011612, "test_accuracy") == 0.1
    assert tidy_number(2.3033089447021484, "loss") == 2.30331 and tidy_number(105062.5) == 105062  # 6 digits
    assert tidy_number(3, "runs") == 3 and tidy_number(None) is None
