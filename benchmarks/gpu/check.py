"""The GPU targets of the benchmarks issue, measured in one process and written to one JSON file.

- net4 inference images/s per precision (fp32, tf32, bf16, fp16) and mode (eager channels_last, torch.compile),
  each with its top-1 agreement against fp32 on the test set; the best precision with agreement >= 99 % wins.
- occlusion maps (K=8, stride 1) for 1,000 test images: wall time and maps/s.
- training: net4's fast-recipe run (trained earlier by run.sh): best accuracy and seconds of training until
  the report's 88.7 % was first reached.

``--dry-run`` runs the same steps on the CPU on a tiny budget so the script is known to work before GPU time is
spent on it.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

REPORT_NET4 = 0.887
AGREEMENT = 0.99


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["card"] = platform.processor() or platform.machine()
    return info


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds per call after warm-up; CUDA events on the GPU, a synchronised host clock elsewhere."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def inference(model, test_x: torch.Tensor, device: torch.device, batch: int, iters: int, compile_ok: bool) -> list:
    """images/s and top-1 agreement with fp32 for each precision and mode."""
    results = []
    base = model.to(device).eval().to(memory_format=torch.channels_last)

    def predictions(m, dtype):
        """Top-1 over the test set in chunks of exactly ``batch`` (the last one padded): no recompiles."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(test_x), batch):
                chunk = test_x[i:i + batch]
                x = torch.cat([chunk, chunk.new_zeros(batch - len(chunk), *chunk.shape[1:])])
                x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
                out.append(m(x).float().argmax(1)[:len(chunk)].cpu())
        return torch.cat(out)

    reference = predictions(base, torch.float32)
    x_bench = test_x[:batch].to(device)
    if len(x_bench) < batch:
        x_bench = x_bench.repeat((batch + len(x_bench) - 1) // len(x_bench), 1, 1, 1)[:batch]
    variants = [("eager", "fp32"), ("eager", "tf32"), ("eager", "bf16"), ("eager", "fp16")]
    if compile_ok:
        variants += [("compile", "bf16"), ("compile", "fp16")]
    for mode, precision in variants:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        m = base.to(dtype)
        if mode == "compile":
            t0 = time.perf_counter()
            m = torch.compile(m)
        x = x_bench.to(dtype).contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                m(x)

        try:
            if mode == "compile":
                run()
                compile_s = time.perf_counter() - t0
            seconds = timed(run, device, iters)
            agree = (predictions(m, dtype) == reference).float().mean().item()
        except Exception as exc:  # a mode that fails on this stack is reported, not fatal
            results.append({"mode": mode, "precision": precision, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        row = {"mode": mode, "precision": precision, "batch": batch, "images_per_s": round(batch / seconds, 1),
               "top1_agreement": agree}
        if mode == "compile":
            row["compile_s"] = round(compile_s, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        base = base.float()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return results


def occlusion(model, data: str, device: torch.device, n_images: int) -> list[dict]:
    """Each exact engine in turn, so the summary shows which one meets the target on this card."""
    from cifarbench.analysis.occlusion import occlude_dataset_throughput

    from cifarbench.runtime import TorchRuntime

    rows = []
    batch = 8 if device.type == "cpu" else 64
    variants = [("dense", "fp32"), ("incremental", "fp32")]
    if device.type == "cuda":
        variants += [("dense", "tf32"), ("dense", "fp16")]
    for mode, precision in variants:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        # a half-precision net goes in as a runtime (the dense engine runs any runtime)
        subject = TorchRuntime(model, device, precision=precision) if precision == "fp16" else model
        try:
            row = occlude_dataset_throughput(subject, data, n=n_images, k=8, mode=mode, backend="torch",
                                             device=device, batch=batch)
            rows.append({**row, "precision": precision})
        except Exception as exc:  # report and go on to the next engine
            rows.append({"mode": mode, "precision": precision, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def training(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "metrics.csv").is_file():
        return {"status": "no net4 run"}
    import csv

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    best = max(rows, key=lambda r: float(r["test_accuracy"]))
    reached = next((r for r in rows if float(r["test_accuracy"]) >= REPORT_NET4), None)
    return {"epochs": len(rows), "best_test_accuracy": float(best["test_accuracy"]), "best_epoch": int(best["epoch"]),
            "best_test_accuracy_tta": float(best["test_accuracy_tta"] or "nan"),
            "train_seconds": float(rows[-1]["run_duration"]),
            "seconds_to_88_7": float(reached["run_duration"]) if reached else None,
            "epoch_to_88_7": int(reached["epoch"]) if reached else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--net4-run", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()

    from cifarbench import create_model, load_model
    from cifarbench.data import load_split
    from cifarbench.zoo import bundled_weights

    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run, **device_info(device)}
    if args.net4_run and (args.net4_run / "best.safetensors").is_file():
        model, source = load_model(args.net4_run / "best.safetensors"), str(args.net4_run)
    elif bundled_weights("net4"):
        model, source = load_model("net4"), "bundled"
    else:
        torch.manual_seed(0)
        model, source = create_model("net4").eval(), "random weights"
    if args.dry_run:
        torch.manual_seed(0)
        model, source = create_model("net4", l1_oc=8).eval(), "dry run: random net4 l1_oc=8"
    summary["net4_weights"] = source
    test = load_split(args.data, "test")
    test_x = test.float_images()
    if args.dry_run:
        test_x = test_x[:128]

    def step(name, fn):
        t = time.perf_counter()
        try:
            summary[name] = fn()
        except Exception as exc:  # keep the other steps' results when one breaks on a new stack
            summary[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        summary[name + "_wall_s"] = round(time.perf_counter() - t, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"== {name}: {json.dumps(summary[name])[:2000]}", flush=True)

    step("training", lambda: training(args.net4_run))
    step("inference", lambda: inference(model, test_x, device, batch=64 if args.dry_run else 4096,
                                        iters=3 if args.dry_run else 30, compile_ok=not args.dry_run))
    rows = [r for r in summary["inference"] if isinstance(summary["inference"], list) and "images_per_s" in r
            and r["top1_agreement"] >= AGREEMENT]
    summary["best_inference"] = max(rows, key=lambda r: r["images_per_s"]) if rows else None
    step("occlusion", lambda: occlusion(model, args.data, device, 4 if args.dry_run else 1000))


if __name__ == "__main__":
    main()
