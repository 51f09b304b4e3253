"""Turn a finished training run into a bundled-weights file (fp16 safetensors with the run's metadata) and add
its metrics to ``runs.json``, so one GPU call brings back everything ``models/`` needs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cifarbench import load_model
from cifarbench.checkpoint import save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--command", required=True, help="the exact command that trained the run")
    ap.add_argument("--trained-on", default="")
    args = ap.parse_args()
    model = load_model(args.run / "best.safetensors")
    meta = {**model.meta, "command": args.command, "trained_on": args.trained_on}
    dtype = torch.float16 if model.name != "net1" else None  # net1 is tiny: keep fp32
    save_checkpoint(args.out / f"{model.name}.safetensors", model, meta, dtype=dtype)
    runs_file = args.out / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    runs[model.name] = {"command": args.command, "trained_on": args.trained_on,
                        "results": (json.loads((args.run / "results.json").read_text())
                                    if (args.run / "results.json").is_file() else "stopped by the time budget"),
                        "config": json.loads((args.run / "config.json").read_text()),
                        "metrics_csv": (args.run / "metrics.csv").read_text()}
    runs_file.write_text(json.dumps(runs, indent=2))
    print(f"bundled {model.name}: best test accuracy {meta['metrics']['test_accuracy']:.4f} at epoch {meta['epoch']}")


if __name__ == "__main__":
    main()
