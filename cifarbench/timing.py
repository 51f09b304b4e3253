"""Throughput and latency of a runtime, saved runs, and the comparison of two runs (``cifarbench bench``).

Each measurement runs ``warmup`` calls first (compiles, CUDA-graph captures, allocator growth), then times each
call to ``logits`` with the device synchronized before and after, so GPU work is inside the interval. Throughput
is images over the mean call time; latency percentiles are per call (one batch).
"""
from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .bench_report import is_pytest_benchmark
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


def bench_runtime(rt, batches: list[int], warmup: int = 2, iters: int = 10, min_seconds: float = 0.0,
                  flops_per_image: int | None = None, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batches:
        size = rt.input_size   # the model's own side (64 for a 64x64 classifier), never assumed 32
        x = torch.rand(batch, 3, size, size, generator=g).to(rt.device)
        times = time_calls(lambda: rt.logits(x), rt.device, warmup, iters, min_seconds)
        rows.append({"backend": rt.name, "precision": rt.precision, "device": str(rt.device),
                     **summarize(times, batch, flops_per_image)})
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
    """A saved run for ``bench --from``: a cifarbench bench document or pytest-benchmark JSON, as parsed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such benchmark results file: {path}")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    if is_pytest_benchmark(doc):
        return doc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("results"), list):
        raise UserError(f"{path} is not a cifarbench bench result (\"format\": \"{FORMAT}\") "
                        "or a pytest-benchmark JSON (--benchmark-json)")
    return doc


def _key(row: dict) -> tuple:
    return row["backend"], row["precision"], row["device"].split(":")[0], row["batch"]


def compare(base: dict, other: dict) -> list[dict]:
    """Rows present in both runs (same backend, precision, device type, batch) with ``other / base`` ratios."""
    others = {_key(r): r for r in other["results"]}
    rows = []
    for row in base["results"]:
        match = others.get(_key(row))
        if match is None:
            continue
        rows.append({"backend": row["backend"], "precision": row["precision"], "device": row["device"],
                     "batch": row["batch"], "base_images_per_s": row["images_per_s"],
                     "other_images_per_s": match["images_per_s"],
                     "speedup": match["images_per_s"] / row["images_per_s"],
                     "p50_ratio": match["latency_ms"]["p50"] / row["latency_ms"]["p50"]})
    if not rows:
        raise UserError("the two runs share no (backend, precision, device, batch) rows to compare")
    return rows


def results_table(doc: dict):
    from rich.table import Table

    m = doc.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')} x{m.get('cores', '?')}"
    table = Table(title=f"{doc['net']} on {where} ({doc.get('date', '')})")
    for col in ("backend", "precision", "device", "batch", "images/s", "p50 ms", "p90 ms", "p99 ms", "GFLOP/s"):
        table.add_column(col, justify="right" if col not in ("backend", "precision", "device") else "left")
    for r in doc["results"]:
        lat = r["latency_ms"]
        table.add_row(r["backend"], r["precision"], r["device"], str(r["batch"]), f"{r['images_per_s']:,.0f}",
                      f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}",
                      f"{r['gflops']:.1f}" if r.get("gflops") else "-")
    return table


def compare_table(rows: list[dict], base_name: str, other_name: str):
    from rich.table import Table

    table = Table(title=f"{other_name} vs {base_name}")
    for col in ("backend", "precision", "device", "batch", "base img/s", "other img/s", "speedup", "p50 ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["backend"], r["precision"], r["device"], str(r["batch"]), f"{r['base_images_per_s']:,.0f}",
                      f"{r['other_images_per_s']:,.0f}", f"{r['speedup']:.2f}x", f"{r['p50_ratio']:.2f}")
    return table
