"""pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json=FILE``) as rows, tables and comparisons.

The benchmark suites state their targets as ratios within a ``group`` (a baseline and its subject timed in one
run), so each row carries its mean time over the fastest mean of its group; comparing two files (a CPU and a GPU
run, or two commits) matches benchmarks by ``fullname``, which names the test and its parameters but not the
machine.
"""
from __future__ import annotations

import math

FORMAT = "pytest-benchmark"
# the extra_info fields benchmarks/conftest.py records; the suites' own figures (speedups over their baselines,
# accuracy against fp32) are the keys with these prefixes
FIELDS = ("device", "backend", "precision", "batch", "images_per_s", "gflops", "pct_of_peak")
NOTE_PREFIXES = ("speedup_", "max_prob_diff", "x_", "ratio_")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def is_pytest_benchmark(doc) -> bool:
    """Whether ``doc`` has the shape ``--benchmark-json`` writes, down to a positive mean time per benchmark, so
    everything below can index it without checks."""
    return (isinstance(doc, dict) and isinstance(doc.get("machine_info"), dict)
            and isinstance(doc.get("benchmarks"), list)
            and all(isinstance(b, dict) and isinstance(b.get("name"), str) and isinstance(b.get("fullname"), str)
                    and isinstance(b.get("extra_info", {}), dict) and isinstance(b.get("stats"), dict)
                    and _positive(b["stats"].get("mean")) for b in doc["benchmarks"]))


def finite_number(value) -> bool:
    """A real number a report can print: an int or float (not a bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: extra_info fields the report formats as numbers, and those it prints as text
NUMBERS = ("images_per_s", "gflops", "pct_of_peak")
TEXTS = ("device", "backend", "precision", "device_name")


def check(doc: dict, path) -> None:
    """Beyond :func:`is_pytest_benchmark`'s shape: the fields the report formats have the types it formats (a
    number for ``images_per_s``, an integer batch, a string group), else one :class:`UserError` naming the
    benchmark and the field."""
    from .errors import UserError

    info = doc["machine_info"]
    if info.get("cpu") is not None and not isinstance(info["cpu"], dict):
        raise UserError(f"{path}: machine_info.cpu is not an object")
    for b in doc["benchmarks"]:
        extra = b.get("extra_info", {})
        where = f"{path}: benchmark {b['name']!r}"
        if b.get("group") is not None and not isinstance(b["group"], str):
            raise UserError(f"{where}: group {b['group']!r} is not a string")
        for key in NUMBERS:
            if extra.get(key) is not None and not finite_number(extra[key]):
                raise UserError(f"{where}: extra_info.{key} is {extra[key]!r}, not a number")
        if extra.get("batch") is not None and not (isinstance(extra["batch"], int)
                                                   and not isinstance(extra["batch"], bool)):
            raise UserError(f"{where}: extra_info.batch is {extra['batch']!r}, not an integer")
        for key in TEXTS:
            if extra.get(key) is not None and not isinstance(extra[key], str):
                raise UserError(f"{where}: extra_info.{key} is {extra[key]!r}, not a string")
        for key in ("median", "rounds"):
            if b["stats"].get(key) is not None and not finite_number(b["stats"][key]):
                raise UserError(f"{where}: stats.{key} is {b['stats'][key]!r}, not a number")


def _time_per_image(b: dict) -> float | None:
    rate = b.get("extra_info", {}).get("images_per_s")
    return 1 / rate if _positive(rate) else None


def rows(doc: dict) -> list[dict]:
    """One row per benchmark, grouped (groups in order of first appearance, the file's order within each), with
    ``vs_fastest``: its cost over the cheapest in its group (1.0 for the fastest). The cost is the time per image
    when every member of the group counts its images (members may run different batches: the training recipes
    do), else the mean time per round."""
    groups: dict = {}
    for b in doc["benchmarks"]:
        groups.setdefault(b.get("group"), []).append(b)
    out = []
    for group, members in groups.items():
        per_image = all(_time_per_image(b) for b in members)
        cost = {id(b): _time_per_image(b) if per_image else b["stats"]["mean"] for b in members}
        fastest = min(cost.values())
        for b in members:
            stats, extra = b["stats"], b.get("extra_info", {})
            out.append({"group": group, "name": b["name"], "fullname": b["fullname"], "mean_s": stats["mean"],
                        "median_s": stats.get("median"), "rounds": stats.get("rounds"),
                        "vs_fastest": cost[id(b)] / fastest, **{k: extra.get(k) for k in FIELDS},
                        **{k: v for k, v in extra.items() if k.startswith(NOTE_PREFIXES)}})
    return out


def machine(doc: dict) -> dict:
    """The host, its CPU and, when benchmarks ran on CUDA, the GPU (``machine_info`` does not name it; the
    benchmarks' ``extra_info`` does)."""
    info = doc["machine_info"]
    cpu = info.get("cpu") or {}
    out = {"host": info.get("node"), "cpu": cpu.get("brand_raw") or info.get("processor"), "cores": cpu.get("count")}
    gpus = dict.fromkeys(e["device_name"] for e in (b.get("extra_info", {}) for b in doc["benchmarks"])
                         if str(e.get("device", "")).startswith("cuda") and e.get("device_name"))
    if gpus:
        out["gpu"] = ", ".join(gpus)
    return out


def report(doc: dict) -> dict:
    """What ``bench --from FILE --json`` prints for a pytest-benchmark file."""
    return {"format": FORMAT, "machine": machine(doc), "datetime": doc.get("datetime"), "rows": rows(doc)}


def compare_rows(base: dict, other: dict, base_name: str = "the base file",
                 other_name: str = "the other file") -> list[dict]:
    """Benchmarks in both files (same ``fullname``), in ``base``'s order, with ``time_ratio`` (other mean over
    base mean) and ``speedup`` (its inverse: above 1 when ``other`` is faster). A file that holds one fullname twice
    (two merged runs) is refused: which of the two to pair is not knowable."""
    from collections import Counter

    from .errors import UserError

    for doc, which in ((base, base_name), (other, other_name)):
        dupes = sorted(n for n, k in Counter(b["fullname"] for b in doc["benchmarks"]).items() if k > 1)
        if dupes:
            raise UserError(f"{which} has {len(dupes)} benchmark name{'s' if len(dupes) > 1 else ''} more than "
                            f"once ({dupes[0]}): cannot tell which one to compare")
    others = {r["fullname"]: r for r in rows(other)}
    out = []
    for r in rows(base):
        match = others.get(r["fullname"])
        if match is None:
            continue
        out.append({"group": r["group"], "name": r["name"], "fullname": r["fullname"], "base_mean_s": r["mean_s"],
                    "other_mean_s": match["mean_s"], "time_ratio": match["mean_s"] / r["mean_s"],
                    "speedup": r["mean_s"] / match["mean_s"]})
    if not out:
        raise UserError("the two pytest-benchmark files share no benchmark (same fullname) to compare")
    return out


def _seconds(value: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:#.4g} {unit}"
    return f"{value / 1e-9:#.4g} ns"


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rate(value) -> str:
    """Whole numbers with separators from 100 up, three significant digits below (a CPU sweep: 2.97 images/s)."""
    return _number(value, ",.0f" if value is None or abs(value) >= 100 else ".3g")


def _note(value) -> str:
    return format(value, ".3g") if isinstance(value, float) and math.isfinite(value) else str(value)


def _grouped(table, items: list[dict], cells) -> None:
    """Add ``cells(row)`` for each of ``items`` under a bold heading per group, with a rule between groups."""
    from rich.text import Text

    group = object()
    for r in items:
        if r["group"] != group:
            if table.rows:
                table.add_section()
            group = r["group"]
            table.add_row(Text(group or "(no group)", style="bold"))
        table.add_row(*cells(r))


def _name(row: dict):
    """The benchmark's name as Text (``test_x[param]`` would read as rich markup), with its notes below it, one a
    line: a notes column would squeeze the names out of a 120-column terminal."""
    from rich.text import Text

    text = Text(row["name"])
    for k, v in row.items():
        if k.startswith(NOTE_PREFIXES):
            text.append(f"\n  {k}={_note(v)}", style="dim")
    return text


def report_table(doc: dict):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    m = machine(doc)
    where = f"{m['cpu'] or '?'} x{m['cores'] or '?'}"
    if "gpu" in m:
        where = f"{m['gpu']}, {where}"
    when = str(doc.get("datetime") or "?").split(".")[0]
    # borderless and tightly padded: test ids of ~50 characters and the figures fit a 120-column terminal whole
    table = Table(title=f"pytest-benchmark on {m['host'] or '?'}: {where} ({when})",
                  caption="vs fastest: time per image (per round if images are not counted) over the group's fastest",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("benchmark", no_wrap=True)
    for col in ("mean", "vs fastest", "images/s", "GFLOP/s", "%peak"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("precision")
    table.add_column("batch", justify="right", no_wrap=True)

    def cells(r: dict) -> list:
        ratio = r["vs_fastest"]
        return [_name(r), _seconds(r["mean_s"]), "1.00x" if ratio == 1 else f"{ratio:.2f}x slower",
                _rate(r["images_per_s"]), _rate(r["gflops"]), _number(r["pct_of_peak"], ".1f"),
                Text(r["precision"] or "-"), _number(r["batch"], "d")]

    _grouped(table, rows(doc), cells)
    return table


def compare_table(compared: list[dict], base_name: str, other_name: str):
    from rich.table import Table

    table = Table(title=f"{other_name} vs {base_name}", caption="speedup: base mean time over other mean time")
    table.add_column("benchmark")
    for col in ("base mean", "other mean", "speedup"):
        table.add_column(col, justify="right")
    _grouped(table, compared, lambda r: [_name(r), _seconds(r["base_mean_s"]), _seconds(r["other_mean_s"]),
                                         f"{r['speedup']:.2f}x"])
    return table
