"""Hyper-parameter sweeps over the report's grids: expand a grid, run it locally or on Ray, summarize it as the report.

A sweep folder holds ``sweep.json`` (what the sweep is, checked on ``--resume``), one training run folder per
grid point under ``runs/`` (named from the point, so a restarted sweep finds them again), and the summary:
``metrics.csv`` (every run's per-epoch rows, the report's columns), ``summary.json`` (best run and epoch,
per-run results, grouped means), ``grouped/*.csv`` and ``plots/*.png``.

Resume needs no bookkeeping of its own: a run folder with ``results.json`` is finished and skipped; any other
started one (it has ``config.json``) continues from its last finished epoch, or from the start when it was stopped
during its first (``train(resume=True)``), so a killed sweep loses at most the unfinished epochs of the runs that
were in flight. The same rule runs inside Ray tasks, so a trial that Ray retries after a worker crash also continues
instead of starting over.

The grouped means are the report's: the mean over every epoch row of every run in a group (pandas'
``groupby(keys).mean()`` over the per-epoch table), by each varied hyper-parameter, by each pair, and by epoch.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UserError
from .io import write_json, write_text
from .zoo import HPARAMS, check_hparams, get_spec

if TYPE_CHECKING:
    from .train import TrainConfig  # torch: imported only where training happens

MAX_BATCH = 65_536  # as train.MAX_BATCH (not imported: train imports torch)
TRAIN_KEYS = ("lr", "batch_size")  # TrainConfig fields a grid may vary, besides the net's hyper-parameters
GRID_KEYS = HPARAMS + TRAIN_KEYS
GROUP_METRICS = ("loss", "train_accuracy", "test_accuracy", "overfit%", "total_parameters")
STRING_COLUMNS = ("run", "recipe", "name")
RAY_INSTALL = "pip install 'cifarbench[ray]'"
CONNECT_TIMEOUT_S = 5.0

# on_event(kind, trial, payload): "skip" (finished earlier; payload: result), "start" (payload: None),
# "epoch" (payload: the epoch's metrics row), "finish" (payload: result), "fail" (payload: result with "error")
EventFn = Callable[[str, "Trial", object], None]


# ---------------------------------------------------------------------------------------------------- the grid
def parse_grid(items: list[str] | None) -> dict[str, list[str]]:
    """``["lr=0.01,0.001", "batch_size=128"]`` -> ``{"lr": ["0.01", "0.001"], "batch_size": ["128"]}`` (raw)."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--grid {item!r}: expected key=v1,v2,... (e.g. lr=0.01,0.001)")
        if key not in GRID_KEYS:
            raise UserError(f"--grid {item!r}: unknown key {key!r}; known: {', '.join(GRID_KEYS)}")
        if key in grid:
            raise UserError(f"--grid {key} given twice; list all its values in one --grid {key}=v1,v2")
        vals = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in vals):
            raise UserError(f"--grid {item!r}: empty value; expected key=v1,v2,...")
        grid[key] = vals
    return grid


def normalize_grid(net: str, grid: dict[str, list]) -> dict[str, list]:
    """Typed, validated values (``"2"`` -> ``2.0`` for filter_multiplier), so equal settings get equal names."""
    if not grid:
        raise UserError(f"empty grid for {net}: give at least one --grid key=v1,v2")
    out: dict[str, list] = {}
    for key, values in grid.items():
        if key not in GRID_KEYS:
            raise UserError(f"unknown grid key {key!r}; known: {', '.join(GRID_KEYS)}")
        if not values:
            raise UserError(f"grid key {key!r} has no values")
        typed = [_typed(net, key, v) for v in values]
        if len(set(map(repr, typed))) != len(typed):
            raise UserError(f"grid key {key!r} repeats a value: {values}")
        out[key] = typed
    return out


def _typed(net: str, key: str, value):
    if key in HPARAMS:  # the zoo's one validator (types, ranges, the net's size), as for --set and checkpoints
        return check_hparams(net, {key: value}, context="--grid")[key]
    kind = float if key == "lr" else int
    try:
        typed = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r} is not a valid {kind.__name__}") from None
    if not typed > 0 or (kind is float and not math.isfinite(typed)):
        raise UserError(f"{key} must be positive, got {value!r}")
    if key == "batch_size" and typed > MAX_BATCH:
        raise UserError(f"batch_size must be at most {MAX_BATCH}, got {value!r}")
    return typed


def default_grid(net: str) -> dict[str, list]:
    """The net's Part-1 grid from the report (``seed_grid`` in its models/*.json)."""
    return {k: list(v) for k, v in get_spec(net)["seed_grid"].items()}


def expand(grid: dict[str, list]) -> list[dict]:
    """Every combination, the first key varying slowest (the report's run order)."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def point_name(point: dict) -> str:
    """A run folder name that is a function of the grid point only: ``lr=0.01,batch_size=128``."""
    return ",".join(f"{k}={v}" for k, v in point.items())


# --------------------------------------------------------------------------------------------------- the plan
@dataclass
class Trial:
    """One grid point: its training config and its run folder."""

    index: int
    name: str
    point: dict
    config: TrainConfig
    out: Path

    def finished(self) -> bool:
        return (self.out / "results.json").is_file()


def plan(net: str, grid: dict[str, list], out: str | Path, *, recipe: str = "seed", epochs: int | None = None,
         data: str = "cifar10", data_dir: str | None = None, seed: int = 0) -> list[Trial]:
    """One validated trial per grid point (nothing written: a bad point fails before any folder is touched)."""
    from .train import TrainConfig

    grid = normalize_grid(net, grid)
    out = Path(out).resolve()
    trials = []
    for i, point in enumerate(expand(grid)):
        hp = {k: v for k, v in point.items() if k in HPARAMS}
        train_keys = {k: v for k, v in point.items() if k in TRAIN_KEYS}
        config = TrainConfig(net, recipe=recipe, hparams=hp, epochs=epochs, data=data, data_dir=data_dir,
                             seed=seed, run=str(i), **train_keys)
        config.resolved()
        name = point_name(point)
        trials.append(Trial(i, name, point, config, out / "runs" / name))
    return trials


def sweep_dir(trials: list[Trial]) -> Path:
    return trials[0].out.parents[1]


def grid_of(trials: list[Trial]) -> dict[str, list]:
    """The (typed) grid the trials were expanded from."""
    return {k: list(dict.fromkeys(t.point[k] for t in trials)) for k in trials[0].point}


def identity(trials: list[Trial]) -> dict:
    """What makes two sweeps the same sweep (recorded in sweep.json, compared on resume)."""
    c = trials[0].config
    return {"net": c.net, "recipe": c.recipe, "epochs": c.resolved()["epochs"], "grid": grid_of(trials),
            "data": c.data, "seed": c.seed}


def claim(trials: list[Trial], resume: bool = False, check_only: bool = False) -> None:
    """Start the sweep in its folder (write ``sweep.json``) or, on resume, check the folder holds this sweep;
    ``check_only`` raises what claiming would raise and writes nothing."""
    out, ident = sweep_dir(trials), identity(trials)
    record = out / "sweep.json"
    if resume:
        if not record.is_file():
            raise UserError(f"--resume: no sweep in {out} (no sweep.json); drop --resume to start one")
        saved = json.loads(record.read_text())
        diff = [k for k in ident if json.dumps(saved.get(k)) != json.dumps(ident[k])]
        if diff:
            raise UserError(f"--resume: {out} holds a sweep with different {', '.join(diff)} "
                            f"({', '.join(f'{k}={saved.get(k)}' for k in diff)}); rerun with the same options")
    else:
        if record.is_file():
            raise UserError(f"{out} already holds a sweep; add --resume to continue it or pick another --out")
        if not check_only:
            write_json(record, ident)


# ----------------------------------------------------------------------------------------------- one trial
def read_rows(path: str | Path) -> list[dict]:
    """A metrics.csv back as typed rows (numbers as int/float, empty cells as None)."""
    with open(path, newline="") as f:
        return [{k: (v if k in STRING_COLUMNS else _number(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def execute(trial: Trial, train_set, test_set, on_epoch: Callable[[dict], None] | None = None,
            on_batch: Callable[[dict], None] | None = None) -> dict:
    """Run (or continue) one trial; ``{"summary", "rows"}``, or ``{"error"}`` when training diverged.
    ``on_epoch``/``on_batch``: as :func:`cifarbench.train.train` (the live table's epoch rows and the progress
    within an epoch).

    Module-level and free of driver state so a Ray worker runs exactly this."""
    from .train import train

    # any started run continues, even one stopped during its first epoch (only config.json: train restarts it)
    resume = (trial.out / "config.json").is_file()
    try:
        summary = train(trial.config, trial.out, resume=resume, train_set=train_set, test_set=test_set,
                        on_epoch=on_epoch, on_batch=on_batch, show_progress=False)
    except UserError as exc:
        return {"error": str(exc), "resumed": resume}
    return {"summary": summary, "rows": read_rows(trial.out / "metrics.csv"), "resumed": resume}


def finished_result(trial: Trial) -> dict:
    summary = json.loads((trial.out / "results.json").read_text())
    return {"summary": summary, "rows": read_rows(trial.out / "metrics.csv"), "resumed": False}


# ------------------------------------------------------------------------------------------------ executors
def run_sweep(trials: list[Trial], *, executor: str = "local", address: str | None = None,
              cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, ray_cpus: int | None = None,
              datasets: tuple | None = None, on_event: EventFn | None = None) -> dict[int, dict]:
    """Run every unfinished trial; ``{trial.index: result}`` for all trials, finished ones read from disk.

    ``datasets`` is ``(train_set, test_set)`` when the caller loaded them already (else loaded here, once)."""
    check_executor(executor, address, cpus_per_trial, gpus_per_trial)
    emit = on_event or (lambda kind, trial, payload: None)
    results: dict[int, dict] = {}
    for t in trials:
        if t.finished():
            results[t.index] = finished_result(t)
            emit("skip", t, results[t.index])
    todo = [t for t in trials if t.index not in results]
    if not todo:
        return results
    train_set, test_set = datasets or load_data(trials[0].config)
    if executor == "local":
        for t in todo:
            emit("start", t, None)
            results[t.index] = execute(t, train_set, test_set, on_epoch=lambda row, t=t: emit("epoch", t, row),
                                       on_batch=lambda info, t=t: emit("batch", t, info))
            emit("fail" if "error" in results[t.index] else "finish", t, results[t.index])
    else:
        results.update(_run_ray(todo, train_set, test_set, address=address, cpus=cpus_per_trial,
                                gpus=gpus_per_trial, ray_cpus=ray_cpus, emit=emit))
    return results


def load_data(config) -> tuple:
    """Both splits, once per sweep (every trial of a sweep trains on the same data)."""
    from .data import load_split

    return load_split(config.data, "train", config.data_dir), load_split(config.data, "test", config.data_dir)


def check_executor(executor: str, address: str | None, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Everything about where trials run that can be wrong, checked before any folder or data is touched."""
    if executor not in ("local", "ray"):
        raise UserError(f"--executor {executor!r}: use local or ray")
    if not cpus_per_trial > 0 or not gpus_per_trial >= 0:
        raise UserError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0 (got {cpus_per_trial:g}, "
                        f"{gpus_per_trial:g})")
    if executor == "local":
        if address:
            raise UserError("--address needs --executor ray")
        return
    _import_ray()
    if address:
        check_address(address)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def check_address(address: str) -> None:
    """Fail fast on an unreachable cluster: ``ray.init`` itself retries an unreachable GCS for minutes."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address} ({exc.strerror or type(exc).__name__}); "
                        f"start one with `ray start --head` or drop --address for a local Ray") from None


def _ray_trial(trial: Trial, train_set, test_set, queue, cpus: float) -> dict:
    """A Ray task: one trial, its epochs streamed to the driver through ``queue``."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    queue.put(("start", trial.index, None))
    return execute(trial, train_set, test_set, on_epoch=lambda row: queue.put(("epoch", trial.index, row)),
                   on_batch=lambda info: queue.put(("batch", trial.index, info)))


@contextmanager
def ray_session(address: str | None = None, ray_cpus: int | None = None, cpus_per_trial: float = 1.0,
                gpus_per_trial: float = 0.0):
    """Connect to ``address`` or start a local Ray with ``ray_cpus`` CPUs, check it can place one trial, and
    shut it down after; where Ray is already initialized, only the check (the caller owns that session)."""
    ray = _import_ray()
    if ray.is_initialized():
        _check_resources(ray, cpus_per_trial, gpus_per_trial)
        yield ray
        return
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot connect to the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    else:
        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        _check_resources(ray, cpus_per_trial, gpus_per_trial)
        yield ray
    finally:
        ray.shutdown()


def _check_resources(ray, cpus: float, gpus: float) -> None:
    """A trial asking for more than the cluster has would wait forever; say so instead."""
    have = ray.cluster_resources()
    for what, need, name in (("CPU", cpus, "--cpus-per-trial"), ("GPU", gpus, "--gpus-per-trial")):
        if need > have.get(what, 0):
            raise UserError(f"{name} {need:g} is more than the Ray cluster has ({have.get(what, 0):g} {what})")


def _run_ray(todo: list[Trial], train_set, test_set, *, address, cpus, gpus, ray_cpus, emit) -> dict:
    with ray_session(address, ray_cpus, cpus, gpus) as ray:
        from ray.util.queue import Empty, Queue

        queue = Queue(actor_options={"num_cpus": 0})
        data = ray.put(train_set), ray.put(test_set)  # once into the object store, shared by every task
        task = ray.remote(_ray_trial).options(num_cpus=cpus, num_gpus=gpus)
        by_index = {t.index: t for t in todo}
        pending = {task.remote(t, *data, queue, cpus): t for t in todo}
        results = {}

        def drain():
            while True:
                try:
                    kind, index, payload = queue.get_nowait()
                except Empty:
                    return
                emit(kind, by_index[index], payload)

        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            drain()
            for ref in done:
                t = pending.pop(ref)
                results[t.index] = ray.get(ref)
                emit("fail" if "error" in results[t.index] else "finish", t, results[t.index])
        return results


# ------------------------------------------------------------------------------------------------ summaries
def sweep_rows(trials: list[Trial], results: dict[int, dict]) -> list[dict]:
    """Every finished run's per-epoch rows in run order, with the run folder name appended."""
    rows = []
    for t in trials:
        for row in results.get(t.index, {}).get("rows", []):
            rows.append({**row, "name": t.name})
    return rows


def grouped_means(rows: list[dict], keys: tuple[str, ...], metrics=GROUP_METRICS) -> list[dict]:
    """The report's grouped table: per distinct value of ``keys``, the mean of each metric over all its rows."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    table = []
    for values in sorted(groups, key=lambda vs: [(v is None, v) for v in vs]):
        members = groups[values]
        entry = dict(zip(keys, values))
        entry["runs"] = len({r["run"] for r in members})
        for m in metrics:
            entry[m] = math.fsum(r[m] for r in members) / len(members)
        table.append(entry)
    return table


def groupings(grid: dict[str, list]) -> list[tuple[str, ...]]:
    """By each varied key, by each pair of varied keys (grid order), and by epoch."""
    varied = [k for k, v in grid.items() if len(v) > 1]
    return [(k,) for k in varied] + list(itertools.combinations(varied, 2)) + [("epoch",)]


def best_row(rows: list[dict]) -> dict | None:
    """The best run and epoch by test accuracy (the earliest on ties)."""
    return max(rows, key=lambda r: r["test_accuracy"], default=None)


def summarize(trials: list[Trial], results: dict[int, dict]) -> dict:
    grid = grid_of(trials)
    rows = sweep_rows(trials, results)
    runs = []
    for t in trials:
        r = results.get(t.index, {})
        s = r.get("summary", {})
        runs.append({"run": t.index, "name": t.name, "point": t.point, "out": str(t.out),
                     "status": "failed" if "error" in r else "finished",
                     "resumed": r.get("resumed", False), "error": r.get("error"),
                     **{k: s.get(k) for k in ("best_epoch", "best_test_accuracy", "final_test_accuracy",
                                              "train_seconds", "total_parameters")}})
    best = best_row(rows)
    if best is not None:  # the metrics row's run label is the trial's index as text: the same int as runs[].run
        best = {**best, "run": int(best["run"])}
    return {**identity(trials), "best": best, "runs": runs,
            "grouped": [{"by": list(keys), "rows": grouped_means(rows, keys)} for keys in groupings(grid)]}


def table_name(keys) -> str:
    return "__".join(keys)


#: grouped CSVs: accuracies (fractions) to 6 decimals and overfit% (percentage points) to 4 -- both 1e-4
#: percentage points, below which the float32 test accuracy's noise lies (an overfit% of -1.49e-07 is 0) --, every
#: other float to 6 significant digits; whole numbers as integers
CSV_DECIMALS = {"train_accuracy": 6, "test_accuracy": 6, "overfit%": 4}
CSV_DIGITS = 6


def tidy_number(value, column: str | None = None):
    """A grouped table's number as a CSV shows it (:data:`CSV_DECIMALS`): ``72302.0`` -> ``72302``,
    ``-1.49e-07`` (overfit%) -> ``0``, ``2.3033089447021484`` -> ``2.30331``; never ``-0``."""
    if value is None or isinstance(value, (bool, int)) or not isinstance(value, float) or not math.isfinite(value):
        return value
    if column in CSV_DECIMALS:
        value = round(value, CSV_DECIMALS[column])
    elif value:
        value = round(value, CSV_DIGITS - 1 - math.floor(math.log10(abs(value))))
    value += 0.0  # -0.0 -> 0.0
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def tidy_rows(rows: list[dict], columns) -> list[dict]:
    """``rows`` with the numbers of ``columns`` tidied (:func:`tidy_number`); other cells as they are."""
    return [{k: tidy_number(v, k) if k in columns else v for k, v in r.items()} for r in rows]


def grid_text(grid: dict) -> str:
    """``{"l1_oc": ["8", "16"], "kernel_size": [3, 5]}`` -> ``l1_oc=8,16 kernel_size=3,5`` (as typed on the
    command line)."""
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in grid.items())


def data_name(data: str | None) -> str:
    """The data as a figure names it: ``synthetic:200``, ``cifar10``, a path's file name."""
    data = str(data or "")
    return Path(data).name if ("/" in data or "\\" in data) else data


def write_outputs(out: str | Path, summary: dict, rows: list[dict]) -> dict[str, str]:
    """metrics.csv, summary.json, grouped/<keys>.csv and plots/*.png under ``out``; returns what was written.

    metrics.csv holds the raw per-epoch rows (the report's columns); the grouped CSVs the means rounded for a
    reader (:func:`tidy_number`); summary.json the exact means."""
    from .sweep_plots import plot_curves, plot_grouped
    from .train import metric_columns, rows_csv

    out = Path(out)
    files = {}
    prov = summary.get("provenance") or {}
    net = (prov.get("model") or {}).get("name") or summary.get("net") or "sweep"
    net = net.split(" ")[0]
    # the figures' one title: model and data here, what is drawn added by the plot
    subject = " · ".join(p for p in (net, data_name(summary.get("data") or (prov.get("data") or {}).get("identity")))
                         if p)
    cap = None
    if prov:
        from .provenance import caption

        # the data by its file name, as in the title (the full path stays in the provenance)
        data = prov.get("data") or {}
        shown = {**prov, "data": {**data, "identity": data_name(data.get("identity"))}} if data else prov
        cap = caption(shown, f"grid {grid_text(prov.get('grid') or summary.get('grid') or {})}")
    if rows:
        hparams = {k: None for k in HPARAMS}
        files["metrics"] = out / "metrics.csv"
        write_text(files["metrics"], rows_csv(rows, metric_columns(hparams) + ["name"]))
        files["curves"] = out / "plots" / "test_accuracy.png"
        plot_curves(rows, files["curves"], title=subject, caption=cap)
    for group in summary["grouped"]:
        if not group["rows"]:
            continue
        name = table_name(group["by"])
        files[f"grouped:{name}"] = out / "grouped" / f"{name}.csv"
        write_text(files[f"grouped:{name}"], rows_csv(tidy_rows(group["rows"], GROUP_METRICS),
                                                      group["by"] + ["runs", *GROUP_METRICS]))
        files[f"plot:{name}"] = out / "plots" / f"grouped_{name}.png"
        plot_grouped(group["rows"], group["by"], files[f"plot:{name}"], title=subject, caption=cap)
    files = {k: str(v) for k, v in files.items()}
    files["summary"] = str(out / "summary.json")
    write_json(out / "summary.json", {**summary, "files": files})
    return files
