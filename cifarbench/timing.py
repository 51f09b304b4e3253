"""Throughput and latency of a runtime, saved runs, and the comparison of two runs (``cifarbench bench``).

Each measurement runs ``warmup`` calls first (compiles, CUDA-graph captures, allocator growth), then times each
call to ``logits`` with the device synchronized before and after, so GPU work is inside the interval. Throughput
is images over the mean call time (``images_per_s = batch / latency_ms["mean"]``; the table shows that mean beside
the percentiles); latency percentiles are per call (one batch). A model with a fixed batch B (or a largest batch,
an engine's profile) runs a batch of N as ``ceil(N / B)`` calls of B: the row records ``calls`` and ``model_batch``
and the table says so.

Comparing two runs (:func:`compare`) pairs rows by backend, precision and batch, not by device, so a CPU run and
a GPU run of the same model pair up (the speedup is the point). Two runs of different models (content digest, else
name) are refused unless ``allow_different_models``; a run with two rows for one (backend, precision, batch) is
refused as ambiguous (``bench`` itself measures each backend and batch once).
"""
from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .bench_report import finite_number, is_pytest_benchmark
from .errors import UserError

FORMAT = "cifarbench-bench/1"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_calls(fn, device: torch.device, warmup: int = 2, iters: int = 10, min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of ``fn()`` after ``warmup`` calls: at least ``iters`` calls and ``min_seconds`` in all."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    while len(times) < iters or sum(times) < min_seconds:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times: list[float], batch: int, flops_per_image: int | None) -> dict:
    mean = sum(times) / len(times)
    row = {"batch": batch, "iters": len(times), "images_per_s": batch / mean,
           "latency_ms": {"mean": 1e3 * mean, "p50": 1e3 * percentile(times, 50), "p90": 1e3 * percentile(times, 90),
                          "p99": 1e3 * percentile(times, 99), "min": 1e3 * min(times)}}
    row["gflops"] = flops_per_image * batch / mean / 1e9 if flops_per_image else None
    return row


def available_memory(device: torch.device | None = None) -> int | None:
    """Bytes that can be allocated now: the host's ``MemAvailable`` (free pages where /proc is absent), or a CUDA
    device's free memory; None where unknown."""
    if device is not None and torch.device(device).type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001  (no CUDA here: the backend reports it)
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def check_batch_memory(batches: list[int], input_size: int, device: torch.device) -> None:
    """Refuse a batch whose float32 input alone (``batch * 3 * S * S * 4`` bytes, made on the host and then on
    ``device``) exceeds half the memory available there: its activations would not fit either."""
    for where in dict.fromkeys([torch.device("cpu"), torch.device(device)]):
        free = available_memory(where)
        if free is None:
            continue
        for batch in batches:
            need = batch * 3 * input_size * input_size * 4
            if need > free // 2:
                raise UserError(f"--batch {batch}: its {input_size}x{input_size} float32 input alone is "
                                f"{_size(need)}, more than half the {_size(free)} of memory available on "
                                f"{where.type}; use smaller batches")


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (torch's CPU allocator raises a plain RuntimeError, ONNX Runtime
    its own type)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "bad allocation",
                                   "failed to allocate memory"))


def bench_runtime(rt, batches: list[int], warmup: int = 2, iters: int = 10, min_seconds: float = 0.0,
                  flops_per_image: int | None = None, seed: int = 0) -> list[dict]:
    """One row per batch size (each measured once: a repeated size is skipped)."""
    import math

    check_batch_memory(batches, rt.input_size, rt.device)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for batch in dict.fromkeys(batches):
        size = rt.input_size   # the model's own side (64 for a 64x64 classifier), never assumed 32
        try:
            x = torch.rand(batch, 3, size, size, generator=g).to(rt.device)
            times = time_calls(lambda: rt.logits(x), rt.device, warmup, iters, min_seconds)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"--batch {batch}: {rt.name} ran out of memory ({first}); use smaller batches") \
                from None
        row = {"backend": rt.name, "precision": rt.precision, "device": str(rt.device),
               **summarize(times, batch, flops_per_image)}
        step = rt.fixed_batch or (rt.max_batch if rt.max_batch and batch > rt.max_batch else None)
        if step and step != batch:  # what one logits() call of this batch really ran
            row.update(calls=math.ceil(batch / step), model_batch=step, fixed=bool(rt.fixed_batch))
        rows.append(row)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import onnxruntime

    from .checkpoint import versions

    info = {"host": platform.node(), "cpu": cpu_name(),
            "cores": len(__import__("os").sched_getaffinity(0)), **versions(), "onnxruntime": onnxruntime.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def run_bench(model, specs, batches: list[int], device: torch.device, warmup: int = 2, iters: int = 10,
              min_seconds: float = 0.0, step=None, **options) -> dict:
    """Benchmark each backend spec at each batch size; the document ``--from`` renders. ``step(label)`` is
    called before each backend."""
    from .nets import count_flops
    from .runtime import open_runtime, resolve_module

    module = resolve_module(model)
    flops = count_flops(module)
    rows = []
    for spec in specs:
        if step:
            step(spec.label)
        rt = open_runtime(module, spec.backend, device=device, precision=spec.precision, **options)
        rows += bench_runtime(rt, batches, warmup, iters, min_seconds, flops)
    return {"format": FORMAT, "net": module.name, "source": str(getattr(module, "source", "") or "in-memory"),
            "flops_per_image": flops, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "warmup": warmup, "iters": iters, "results": rows}


def load_results(path: str | Path) -> dict:
    """A saved run for ``bench --from``: a cifarbench bench document or pytest-benchmark JSON, as parsed, checked
    down to every field the report reads (a damaged or hand-edited file is one :class:`UserError` naming what is
    wrong, never a KeyError in the middle of a table)."""
    from .bench_report import check as check_pytest_benchmark

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such benchmark results file: {path}")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    if is_pytest_benchmark(doc):
        check_pytest_benchmark(doc, path)
        return doc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("results"), list):
        raise UserError(f"{path} is not a cifarbench bench result (\"format\": \"{FORMAT}\") "
                        "or a pytest-benchmark JSON (--benchmark-json)")
    _check_run(doc, path)
    return doc


def _number(value, positive: bool = False) -> bool:
    return finite_number(value) and (value > 0 if positive else value >= 0)


def _check_run(doc: dict, path: Path) -> None:
    """The fields :func:`results_table` and :func:`compare` read, with their types."""
    def bad(what: str) -> UserError:
        return UserError(f"{path}: {what}; not a complete cifarbench bench result")

    if not isinstance(doc.get("net"), str):
        raise bad("no \"net\" (the model's name)")
    for key in ("machine", "model"):
        if key in doc and not isinstance(doc[key], (dict, type(None))):
            raise bad(f"\"{key}\" is not an object")
    if "date" in doc and not isinstance(doc["date"], (str, type(None))):
        raise bad("\"date\" is not a string")
    if not doc["results"]:
        raise bad("\"results\" is empty")
    for i, row in enumerate(doc["results"]):
        where = f"results[{i}]"
        if not isinstance(row, dict):
            raise bad(f"{where} is not an object")
        for key in ("backend", "precision", "device"):
            if not isinstance(row.get(key), str):
                raise bad(f"{where} has no \"{key}\" string")
        if not (isinstance(row.get("batch"), int) and not isinstance(row["batch"], bool) and row["batch"] > 0):
            raise bad(f"{where} has no positive integer \"batch\"")
        if not _number(row.get("images_per_s"), positive=True):
            raise bad(f"{where} \"images_per_s\" is {row.get('images_per_s')!r}, not a positive number")
        lat = row.get("latency_ms")
        if not isinstance(lat, dict):
            raise bad(f"{where} has no \"latency_ms\" object")
        for q in ("p50", "p90", "p99"):
            if not _number(lat.get(q), positive=True):
                raise bad(f"{where} latency_ms.{q} is {lat.get(q)!r}, not a positive number")
        if "mean" in lat and not _number(lat["mean"], positive=True):
            raise bad(f"{where} latency_ms.mean is {lat['mean']!r}, not a positive number")
        if row.get("gflops") is not None and not _number(row["gflops"]):
            raise bad(f"{where} \"gflops\" is {row['gflops']!r}, not a number")
        for key in ("calls", "model_batch"):
            if key in row and not (isinstance(row[key], int) and not isinstance(row[key], bool) and row[key] > 0):
                raise bad(f"{where} \"{key}\" is {row[key]!r}, not a positive integer")


def _key(row: dict) -> tuple:
    """Rows pair by backend, precision and batch: not by device, so a CPU run and a GPU run compare."""
    return row["backend"], row["precision"], row["batch"]


def model_identity(doc: dict) -> tuple[str, str | None]:
    """(name, content digest or None) of the model a run measured."""
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    digest = model.get("digest")
    return doc["net"], digest if isinstance(digest, str) and digest else None


def same_model(base: dict, other: dict) -> bool:
    """Whether two runs measured the same model: the same content digest where both record one, else the same
    name."""
    (name_a, digest_a), (name_b, digest_b) = model_identity(base), model_identity(other)
    return digest_a == digest_b if digest_a and digest_b else name_a == name_b


def _index(doc: dict, name: str) -> dict:
    rows: dict = {}
    for row in doc["results"]:
        key = _key(row)
        if key in rows:
            raise UserError(f"{name} has two rows for {key[0]} {key[1]} batch {key[2]} (devices {rows[key]['device']}"
                            f" and {row['device']}): cannot tell which one to compare; keep one")
        rows[key] = row
    return rows


def compare(base: dict, other: dict, base_name: str = "the base run", other_name: str = "the other run",
            allow_different_models: bool = False) -> list[dict]:
    """Rows present in both runs (same backend, precision and batch; any devices) with ``other / base`` ratios.
    Runs of two different models are refused unless ``allow_different_models``; duplicate rows are refused."""
    if not allow_different_models and not same_model(base, other):
        def said(doc):
            name, digest = model_identity(doc)
            return f"{name} (digest {digest[:12]})" if digest else name

        raise UserError(f"{base_name} measured {said(base)} but {other_name} measured {said(other)}: their speedups "
                        f"would compare two different models; pass --allow-different-models to compare anyway")
    base_rows, others = _index(base, base_name), _index(other, other_name)
    rows = []
    for key, row in base_rows.items():
        match = others.get(key)
        if match is None:
            continue
        rows.append({"backend": row["backend"], "precision": row["precision"], "device": row["device"],
                     "other_device": match["device"], "batch": row["batch"],
                     "base_images_per_s": row["images_per_s"], "other_images_per_s": match["images_per_s"],
                     "speedup": match["images_per_s"] / row["images_per_s"],
                     "p50_ratio": match["latency_ms"]["p50"] / row["latency_ms"]["p50"]})
    if not rows:
        raise UserError("the two runs share no (backend, precision, batch) rows to compare")
    return rows


def unpaired(base: dict, other: dict) -> dict[str, list[str]]:
    """The rows of each run that :func:`compare` finds no partner for, as ``backend precision batch B`` (said, so a
    comparison is never read as covering rows it dropped)."""
    a, b = {_key(r) for r in base["results"]}, {_key(r) for r in other["results"]}
    text = lambda keys: [f"{k[0]} {k[1]} batch {k[2]}" for k in sorted(keys, key=str)]  # noqa: E731
    return {"base": text(a - b), "other": text(b - a)}


def batch_label(row: dict) -> str:
    """The batch, and how it ran when the model takes a fixed (or largest) batch: ``16 (16 calls of 1)``."""
    if row.get("calls") and row.get("model_batch"):
        calls = row["calls"]
        return f"{row['batch']} ({calls} call{'s' if calls > 1 else ''} of {row['model_batch']})"
    return str(row["batch"])


def results_table(doc: dict):
    from rich.table import Table

    m = doc.get("machine") or {}
    where = m.get("gpu") or f"{m.get('cpu', '?')} x{m.get('cores', '?')}"
    notes = ["images/s = batch / mean ms (the mean of the timed calls)"]
    if any(r.get("calls") for r in doc["results"]):
        notes.append("N calls of B: the model takes a fixed batch of B (or at most B), so each batch ran as N calls "
                     "of B images (the last padded)")
    table = Table(title=f"{doc['net']} on {where} ({doc.get('date') or ''})", caption="; ".join(notes))
    for col in ("backend", "precision", "device", "batch", "images/s", "mean ms", "p50 ms", "p90 ms", "p99 ms",
                "GFLOP/s"):
        table.add_column(col, justify="right" if col not in ("backend", "precision", "device") else "left")
    for r in doc["results"]:
        lat = r["latency_ms"]
        table.add_row(r["backend"], r["precision"], r["device"], batch_label(r), f"{r['images_per_s']:,.0f}",
                      f"{lat['mean']:.2f}" if "mean" in lat else "-",
                      f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}",
                      f"{r['gflops']:.1f}" if r.get("gflops") else "-")
    return table


def compare_table(rows: list[dict], base_name: str, other_name: str, note: str | None = None):
    from rich.table import Table

    table = Table(title=f"{other_name} vs {base_name}" + (f" — {note}" if note else ""),
                  caption="speedup: other images/s over base images/s; p50 ratio: other p50 over base p50")
    for col in ("backend", "precision", "batch", "base device", "other device", "base img/s", "other img/s",
                "speedup", "p50 ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["backend"], r["precision"], str(r["batch"]), r["device"], r.get("other_device", "?"),
                      f"{r['base_images_per_s']:,.0f}", f"{r['other_images_per_s']:,.0f}", f"{r['speedup']:.2f}x",
                      f"{r['p50_ratio']:.2f}")
    return table
