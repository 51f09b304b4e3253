"""``cifarbench sweep``: a net's hyper-parameter grid, locally or on Ray, resumable, summarized as the report."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..options import DataDirOpt, DataOpt, JsonOpt, OutOpt, SeedOpt

GridOpt = Annotated[Optional[list[str]], typer.Option(
    "--grid", help="key=v1,v2,... for l1_oc, filter_multiplier, kernel_size, stride, dropout, lr, batch_size; "
                   "repeatable (one key per --grid). A single value fixes that setting. Default: the net's grid "
                   "from the report.")]


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep_cmd(
        net: Annotated[str, typer.Argument(help="net1 | net2 | net3 | net4")],
        grid: GridOpt = None,
        epochs: Annotated[Optional[int], typer.Option("--epochs", help="Default: the recipe's.")] = None,
        recipe: Annotated[str, typer.Option("--recipe", help="seed (the report's) | fast")] = "seed",
        data: DataOpt = "cifar10",
        data_dir: DataDirOpt = None,
        executor: Annotated[str, typer.Option("--executor", help="local (one run after another in this "
                                                                 "process) | ray (one Ray task per run)")] = "local",
        address: Annotated[Optional[str], typer.Option(
            "--address", help="Ray cluster (HOST:PORT, ray://HOST:PORT or auto); default: start a local Ray. "
                              "--out must be on storage every node sees, and cifarbench installed there.")] = None,
        gpus_per_trial: Annotated[float, typer.Option("--gpus-per-trial", help="GPUs per Ray task.")] = 0.0,
        cpus_per_trial: Annotated[float, typer.Option("--cpus-per-trial", help="CPUs per Ray task.")] = 1.0,
        ray_cpus: Annotated[Optional[int], typer.Option(
            "--ray-cpus", help="CPUs of the local Ray started without --address (default: all).")] = None,
        out: OutOpt = None,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Continue the sweep in --out: skip finished runs, continue unfinished ones from their "
                             "last epoch.")] = False,
        seed: SeedOpt = 0,
        json: JsonOpt = False,
    ) -> None:
        """Train every point of a grid; writes metrics.csv, summary.json, grouped/*.csv and plots/*.png to --out.

        Examples: cifarbench sweep net1 --grid l1_oc=6,12 --grid kernel_size=3,5 --epochs 2 --out sweep;
        cifarbench sweep net2 --executor ray --cpus-per-trial 2 --resume --out sweep
        """
        from .. import sweep as sw

        values = sw.parse_grid(grid) if grid else sw.default_grid(net)
        sw.check_executor(executor, address, cpus_per_trial, gpus_per_trial)
        out = Path(out or Path("runs") / f"sweep-{net}-{recipe}-s{seed}")
        trials = sw.plan(net, values, out, recipe=recipe, epochs=epochs, data=data,
                         data_dir=str(data_dir) if data_dir else None, seed=seed)
        sw.claim(trials, resume=resume, check_only=True)  # fail fast, before loading data or starting Ray
        from ..io import output_folder

        names = ["sweep.json", "metrics.csv", "summary.json", "plots/test_accuracy.png", "index.html"]
        for keys in sw.groupings(sw.grid_of(trials)):
            names += [f"grouped/{sw.table_name(keys)}.csv", f"plots/grouped_{sw.table_name(keys)}.png"]
        # the sweep's own files in --out are checked now, before any training: none replaces a user's file
        with output_folder(sw.sweep_dir(trials), names, subdirs=("grouped", "plots")):
            _sweep(sw, trials, values, executor, address, ray_cpus, cpus_per_trial, gpus_per_trial, resume, json)


def _sweep(sw, trials, values, executor, address, ray_cpus, cpus_per_trial, gpus_per_trial, resume, json) -> None:
    from ..console import console, emit_json

    # a new sweep loads its data before claiming --out, so a bad --data leaves nothing behind
    datasets = None if resume else sw.load_data(trials[0].config)
    # and connects to Ray first too: an unreachable or too small cluster leaves nothing behind either
    todo = not all(t.finished() for t in trials)
    session = sw.ray_session(address, ray_cpus, cpus_per_trial, gpus_per_trial) if executor == "ray" and todo \
        else nullcontext()
    with session:
        sw.claim(trials, resume=resume)
        with Board(trials, console) as board:
            results = sw.run_sweep(trials, executor=executor, address=address, cpus_per_trial=cpus_per_trial,
                                   gpus_per_trial=gpus_per_trial, ray_cpus=ray_cpus, datasets=datasets,
                                   on_event=board.update)
    out = sw.sweep_dir(trials)
    summary = sw.summarize(trials, results)
    from .publish import command_provenance

    cfg = trials[0].config
    from ..runtime import default_device

    # what train() picked: the given device, else cuda when present (here, or on each Ray worker)
    device = cfg.device or (str(default_device()) if executor == "local" else "each worker's cuda, else cpu")
    summary["provenance"] = command_provenance(
        model=f"{cfg.net} (trained from scratch per grid point)", data=cfg.data, backend="torch (training)",
        precision="fp32", device=device,
        extra={"grid": {k: list(v) for k, v in values.items()}, "recipe": cfg.recipe, "seed": cfg.seed,
               "executor": executor})
    files = sw.write_outputs(out, summary, sw.sweep_rows(trials, results))
    files["index"] = str(write_page(out, summary, files))
    if json:
        emit_json({**summary, "files": files})
        return
    render_summary(summary, console)
    console.print(f"sweep saved in {out} (metrics.csv, summary.json, grouped/, plots/)")


# One convention for a person, in the summary tables here and on index.html: accuracies in percent (and overfit%,
# already in percentage points) rounded to 2 decimals, never -0.00; parameters whole; one header style.
PERCENT_DECIMALS = 2


def as_percent(fraction):
    """An accuracy (a fraction, as in the JSON) as a table shows it: ``0.11250000260770321`` -> ``11.25``."""
    return None if fraction is None else round(100 * float(fraction), PERCENT_DECIMALS) + 0.0


def as_points(points):
    """overfit% (percentage points already): ``-1.49e-07`` -> ``0.0``."""
    return None if points is None else round(float(points), PERCENT_DECIMALS) + 0.0


def as_whole(value):
    """A count that a mean made a float: ``72302.0`` -> ``72302``."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: (header, key in the JSON, how the table shows it) for the grouped means, the best run and the runs
METRIC_COLUMNS = (("loss", "loss", None), ("train acc %", "train_accuracy", as_percent),
                  ("test acc %", "test_accuracy", as_percent), ("overfit %", "overfit%", as_points),
                  ("parameters", "total_parameters", as_whole))
RUN_COLUMNS = (("run", "run", None), ("grid point", "name", None), ("status", "status", None),
               ("best epoch", "best_epoch", None), ("best test acc %", "best_test_accuracy", as_percent),
               ("final test acc %", "final_test_accuracy", as_percent), ("parameters", "total_parameters", as_whole),
               ("train s", "train_seconds", None), ("error", "error", None))


def _cells(row: dict, columns) -> list:
    return [row.get(key) if show is None or row.get(key) is None else show(row[key]) for _, key, show in columns]


def summary_tables(summary: dict) -> list[tuple[str, dict]]:
    """The summary's tables as a person reads them, ``(title, {"columns", "rows"})``: the best run and epoch, the
    grouped means and every run (numbers rounded by one rule for the terminal and index.html)."""
    tables = []
    best = summary.get("best")
    if best:
        columns = (("run", "run", None), ("grid point", "name", None), ("epoch", "epoch", None), *METRIC_COLUMNS)
        tables.append(("Best run and epoch (by test accuracy)",
                       {"columns": [c[0] for c in columns], "rows": [_cells(best, columns)]}))
    for group in summary["grouped"]:
        if group["rows"]:
            columns = (*((k, k, None) for k in group["by"]), ("runs", "runs", None), *METRIC_COLUMNS)
            tables.append((f"Mean over all epochs of all runs, by {' × '.join(group['by'])}",
                           {"columns": [c[0] for c in columns], "rows": [_cells(r, columns) for r in group["rows"]]}))
    tables.append(("Runs", {"columns": [c[0] for c in RUN_COLUMNS],
                            "rows": [_cells(r, RUN_COLUMNS) for r in summary["runs"]]}))
    return tables


def _figure_title(path) -> str:
    """The title a sweep figure carries in its PNG metadata (what it shows, model and data)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.text.get("Title", "")
    except (OSError, ImportError):
        return ""


def write_page(out, summary: dict, files: dict):
    """``out/index.html``: the plots, the best run, the grouped means and every run (as the terminal tables)."""
    from .publish import write_page as page

    prov = summary["provenance"]
    figures = [{"path": v, "caption": _figure_title(v) or Path(v).name} for v in files.values()
               if str(v).endswith(".png") and Path(v).is_file()]
    sections = [{"title": "Plots", "figures": figures}]
    sections += [{"title": title, "table": table} for title, table in summary_tables(summary)]
    return page(out, f"sweep: {prov['model']['name']}", prov, sections, summary)


class Board:
    """The live table on stderr: one row per run, updated every epoch; one log line per event off a terminal."""

    def __init__(self, trials, console):
        self.trials, self.console = trials, console
        self.state = {t.index: {"status": "pending", "epoch": 0} for t in trials}
        self.epochs = trials[0].config.resolved()["epochs"]
        self.live = None
        self.t0 = time.perf_counter()

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self, console=self.console, refresh_per_second=1)  # redrawn through __rich__
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()

    def update(self, kind: str, trial, payload) -> None:
        s = self.state[trial.index]
        if kind == "batch":  # within an epoch: the live table only (a log gets one line per epoch)
            s.update(status="running", batch=payload["batch"], batches=payload["batches"],
                     rate=payload["images_per_s"], in_epoch=payload["epoch"])
            if self.live is not None:
                self.live.refresh()
            return
        if kind == "epoch":
            s.update(status="running", epoch=payload["epoch"], loss=payload["loss"],
                     train=payload["train_accuracy"], test=payload["test_accuracy"],
                     best=max(s.get("best", 0.0), payload["test_accuracy"]))
        elif kind in ("skip", "finish") and "summary" in payload:
            last = payload["rows"][-1]
            s.update(status="skipped (done)" if kind == "skip" else "done", epoch=last["epoch"],
                     loss=last["loss"], train=last["train_accuracy"], test=last["test_accuracy"],
                     best=payload["summary"]["best_test_accuracy"])
        elif kind == "fail":
            s.update(status="failed", error=payload["error"])
        elif kind == "start":
            s.update(status="running")
        if self.live is not None:
            self.live.refresh()
        else:
            self.console.print(self.line(trial, s), soft_wrap=True, highlight=False)

    def line(self, trial, s) -> str:
        n = len(self.trials)
        head = f"[{time.perf_counter() - self.t0:6.0f} s] run {trial.index + 1}/{n} {trial.name}"
        if s["status"] == "failed":
            return f"{head} failed: {s['error']}"
        if "loss" not in s:
            return f"{head} started"
        return (f"{head} {s['status']} epoch {s['epoch']}/{self.epochs} loss {s['loss']:.4f} "
                f"train {s['train']:.2%} test {s['test']:.2%} best {s['best']:.2%}")

    def __rich__(self):
        return self.table()

    def table(self):
        from rich.table import Table

        done = sum(s["status"] in ("done", "skipped (done)") for s in self.state.values())
        table = Table(title=f"sweep: {done}/{len(self.trials)} runs done, "
                            f"{time.perf_counter() - self.t0:.0f} s", title_justify="left")
        for col in ("run", "grid point", "status", "epoch", "batch", "img/s", "loss", "train acc", "test acc",
                    "best test"):
            table.add_column(col, justify="left" if col in ("grid point", "status") else "right")
        for t in self.trials:
            s = self.state[t.index]
            fmt = lambda key, spec: format(s[key], spec) if key in s else ""
            # the epoch under way while its batches run, else the last finished one
            running = s["status"] == "running" and "batch" in s and s["batch"] < s["batches"]
            epoch = s["in_epoch"] if running else s["epoch"]
            batch = f"{s['batch']}/{s['batches']}" if running else ""
            table.add_row(str(t.index), t.name, s["status"], f"{epoch}/{self.epochs}", batch,
                          fmt("rate", ",.0f") if s["status"] == "running" else "", fmt("loss", ".4f"),
                          fmt("train", ".2%"), fmt("test", ".2%"), fmt("best", ".2%"))
        return table


def _text(value) -> str:
    """A number in a terminal table as index.html writes it (report_html.format_number: floats to 4 significant
    digits, integers with thousands separators); percents are written by the caller, with 2 decimals."""
    from ..report_html import format_number

    if value is None:
        return ""
    if isinstance(value, float):
        return format_number(value)
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def render_summary(summary: dict, console) -> None:
    """The report's tables: best run and epoch, then the grouped means (the numbers as on index.html)."""
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal:  # a log file: whole numbers rather than tables squeezed into 80 columns
        console = Console(stderr=True, width=140, no_color=True)

    best = summary["best"]
    if best is None:
        console.print("[red]no run finished[/]")
    else:
        point = ", ".join(f"{k}={best[k]}" for k in summary["grid"])
        console.print(f"[bold]best[/]: run {best['run']} ({point}) epoch {best['epoch']}: test accuracy "
                      f"{as_percent(best['test_accuracy']):.2f}%, train {as_percent(best['train_accuracy']):.2f}%, "
                      f"loss {_text(float(best['loss']))}, {best['total_parameters']:,} parameters", soft_wrap=True)
    percent_heads = {c[0] for c in (*METRIC_COLUMNS, *RUN_COLUMNS) if c[2] in (as_percent, as_points)}
    for title, spec in summary_tables(summary)[1 if best else 0:-1]:  # the grouped means
        table = Table(title=title[0].lower() + title[1:], title_justify="left")
        for col in spec["columns"]:
            table.add_column(col, justify="right")
        for row in spec["rows"]:
            table.add_row(*("" if v is None else f"{v:.2f}" if col in percent_heads else _text(v)
                            for col, v in zip(spec["columns"], row)))
        console.print(table)
    for run in summary["runs"]:
        if run["status"] == "failed":
            console.print(f"[red]run {run['run']} ({run['name']}) failed:[/] {run['error']}")
