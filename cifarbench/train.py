"""Training, airbench-style: the recipes at the top, one loop below, each run's config and results side by side.

A run folder holds ``config.json`` (everything needed to reproduce it), ``metrics.csv`` (one row per epoch, the
report's columns), ``last.safetensors`` + ``last.state.pt`` (resume point, written atomically every epoch),
``best.safetensors`` (best test accuracy) and ``results.json``. ``--resume`` continues from ``last`` and gives the
same result as an uninterrupted run (per-epoch RNG streams; the global RNG state is saved with the checkpoint).
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .checkpoint import load_state, read_metadata, save_checkpoint, save_state, versions
from .data import Dataset, augment, load_split
from .errors import UserError
from .io import write_json, write_text
from .nets import count_parameters
from .zoo import create_model, get_spec, resolve_hparams

# ----------------------------------------------------------------------------------------------------------------
# Recipes. `seed` is the report's (the PyTorch CIFAR-10 tutorial's SGD with lr 0.01, batch 128, constant lr).
# `fast` keeps every architecture fixed and changes only how it is trained: large batch with a one-cycle
# (linear warm-up, linear decay) Nesterov SGD, weight decay, label smoothing, bf16 autocast on GPU,
# crop + flip only (colour jitter slows short schedules down more than it helps them).
RECIPES: dict[str, dict] = {
    "seed": dict(lr=0.01, batch_size=128, momentum=0.9, nesterov=False, weight_decay=0.0, label_smoothing=0.0,
                 schedule="constant", warmup=0.0, jitter=0.2, autocast=False, epochs=None),
    "fast": dict(lr=0.2, batch_size=512, momentum=0.9, nesterov=True, weight_decay=5e-4, label_smoothing=0.1,
                 schedule="onecycle", warmup=0.15, jitter=0.0, autocast=True, epochs=None),
}
# peak lr of the fast recipe per net, as measured on the GPU runs: nets without BatchNorm diverge at the BN
# nets' rate, and net3 (the widest) diverged at 0.2 in its first epochs
FAST_LR = {"net1": 0.05, "net2": 0.05, "net3": 0.1, "net4": 0.2}
FAST_EPOCHS = {"net1": 15, "net2": 30, "net3": 40, "net4": 100}
EVAL_BATCH = 1000
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    net: str
    recipe: str = "seed"
    hparams: dict = field(default_factory=dict)
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    data: str = "cifar10"
    data_dir: str | None = None
    seed: int = 0
    device: str | None = None
    run: str = "0"

    def resolved(self) -> dict:
        """Every setting that decides the result, with recipe defaults filled in."""
        if self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}; known: {', '.join(RECIPES)}")
        spec = get_spec(self.net)
        r = dict(RECIPES[self.recipe])
        if self.recipe == "fast":
            r["lr"] = FAST_LR[self.net]
        if self.epochs is not None:
            r["epochs"] = self.epochs
        else:
            r["epochs"] = spec["seed_recipe"]["epochs"] if self.recipe == "seed" else FAST_EPOCHS[self.net]
        r["lr"] = self.lr if self.lr is not None else r["lr"]
        r["batch_size"] = self.batch_size if self.batch_size is not None else r["batch_size"]
        r["augment"] = spec["seed_recipe"]["augment"]
        if r["epochs"] < 1 or r["batch_size"] < 1 or r["lr"] <= 0:
            raise UserError(f"epochs, batch size and lr must be positive (got {r['epochs']}, {r['batch_size']}, "
                            f"{r['lr']})")
        return {"net": self.net, "recipe": self.recipe, "hparams": resolve_hparams(self.net, **self.hparams),
                "data": self.data, "seed": self.seed, "run": self.run, **r}


def metric_columns(hparams: dict) -> list[str]:
    return (["run", "epoch", "loss", "train_accuracy", "test_accuracy", "test_accuracy_tta", "epoch_duration",
             "run_duration", "total_parameters"] + list(hparams) + ["lr", "batch_size", "recipe", "overfit%"])


def _lr_factor(cfg: dict, step: int, total: int) -> float:
    if cfg["schedule"] == "constant":
        return 1.0
    warm = max(1, int(cfg["warmup"] * total))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


@torch.no_grad()
def evaluate_logits(model: torch.nn.Module, data: Dataset, device: torch.device, tta: bool = False,
                    autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eval-mode logits for a whole split and, with ``tta``, the flip-TTA logits (the mean of the image's and its
    mirror's), from one pass over the data."""
    model.eval()
    plain, flipped = [], []
    for i in range(0, len(data), EVAL_BATCH):
        x = data.images[i:i + EVAL_BATCH].to(device).float().div_(255)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x).float()
            plain.append(logits.cpu())
            if tta:
                flipped.append(((logits + model(x.flip(3)).float()) / 2).cpu())
    return torch.cat(plain), (torch.cat(flipped) if tta else None)


def build(cfg: dict, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The seeded model (channels_last: faster convs on both oneDNN and cuDNN) and its optimizer; biases and BN
    parameters get no weight decay."""
    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["net"], **cfg["hparams"]).to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    return model, opt


def batch_input(images: torch.Tensor, cfg: dict, gen: torch.Generator) -> torch.Tensor:
    """A uint8 batch as the net's float input, augmented when the net's recipe augments."""
    x = augment(images, gen, jitter=cfg["jitter"]) if cfg["augment"] else images.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


def train_step(model, opt, x: torch.Tensor, y: torch.Tensor, cfg: dict, autocast: bool):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg["label_smoothing"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits


def train(config: TrainConfig, out: str | Path, *, resume: bool = False, train_set: Dataset | None = None,
          test_set: Dataset | None = None, on_epoch: Callable[[dict], None] | None = None,
          show_progress: bool = True) -> dict:
    """Train one run into ``out``; returns the summary also written to ``results.json``."""
    out = Path(out)
    cfg = config.resolved()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if resume:
        cfg = _check_resume(out, cfg, config.epochs)
    train_set = train_set or load_split(config.data, "train", config.data_dir)
    test_set = test_set or load_split(config.data, "test", config.data_dir)

    model, opt = build(cfg, device)
    torch.backends.cudnn.benchmark = on_gpu  # fixed shapes: let cuDNN pick the fastest kernels once
    steps_per_epoch = math.ceil(len(train_set) / cfg["batch_size"])
    total_steps = steps_per_epoch * cfg["epochs"]
    n_params = count_parameters(model)
    meta_base = {"net": cfg["net"], "hparams": cfg["hparams"], "recipe": cfg["recipe"], "seed": cfg["seed"],
                 "data": train_set.identity.rsplit(":", 1)[0], "versions": versions(), "config": cfg}

    history: list[dict] = []
    start_epoch, run_time, best_acc = 1, 0.0, -1.0
    if resume:
        state = load_state(out / "last.state.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if on_gpu and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        history = state["history"]
        start_epoch, run_time = int(state["epoch"]) + 1, float(state["run_time"])
        best_acc = max((h["test_accuracy"] for h in history), default=-1.0)
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**cfg, "data_identity": train_set.identity, "device": str(device),
                                         "versions": versions(), "total_parameters": n_params})

    columns = metric_columns(cfg["hparams"])
    train_images, train_labels = train_set.images.to(device), train_set.labels.to(device)
    use_autocast = cfg["autocast"] and on_gpu
    bar = None
    if show_progress:
        from .console import progress

        bar = progress()
        bar.start()
        task = bar.add_task(f"{cfg['net']} {cfg['recipe']}", total=cfg["epochs"], completed=start_epoch - 1,
                            status="")
    try:
        for epoch in range(start_epoch, cfg["epochs"] + 1):
            t0 = time.perf_counter()
            model.train()
            gen = torch.Generator(device=device).manual_seed(cfg["seed"] * 100_003 + epoch)
            order = torch.randperm(len(train_set), device=device, generator=gen)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for b in range(steps_per_epoch):
                idx = order[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
                step = (epoch - 1) * steps_per_epoch + b
                for g in opt.param_groups:
                    g["lr"] = cfg["lr"] * _lr_factor(cfg, step, total_steps)
                y = train_labels[idx]
                loss, logits = train_step(model, opt, batch_input(train_images[idx], cfg, gen), y, cfg, use_autocast)
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
            train_loss = loss_sum.item() / len(train_set)
            train_acc = correct.item() / len(train_set)
            if not math.isfinite(train_loss):
                raise UserError(f"training diverged at epoch {epoch} (loss {train_loss}); lower --lr")
            epoch_time = time.perf_counter() - t0  # training time only, as the report's "epoch duration"
            run_time += epoch_time
            test_logits, tta_logits = evaluate_logits(model, test_set, device, tta=cfg["recipe"] == "fast",
                                                      autocast=use_autocast)
            test_acc = (test_logits.argmax(1) == test_set.labels).float().mean().item()
            tta_acc = None if tta_logits is None else (tta_logits.argmax(1) == test_set.labels).float().mean().item()
            row = {"run": cfg["run"], "epoch": epoch, "loss": train_loss, "train_accuracy": train_acc,
                   "test_accuracy": test_acc, "test_accuracy_tta": tta_acc, "epoch_duration": epoch_time,
                   "run_duration": run_time, "total_parameters": n_params, **cfg["hparams"], "lr": cfg["lr"],
                   "batch_size": cfg["batch_size"], "recipe": cfg["recipe"],
                   "overfit%": 100 * (train_acc - test_acc)}
            history.append(row)
            meta = {**meta_base, "epoch": epoch, "metrics": {k: row[k] for k in
                    ("loss", "train_accuracy", "test_accuracy", "test_accuracy_tta")}}
            if test_acc > best_acc:
                best_acc = test_acc
                save_checkpoint(out / "best.safetensors", model, meta)
            save_checkpoint(out / "last.safetensors", model, meta)
            save_state(out / "last.state.pt", {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "run_time": run_time,
                "rng_cpu": torch.get_rng_state(),
                **({"rng_cuda": torch.cuda.get_rng_state(device)} if on_gpu else {}),
                "history": history})
            write_text(out / "metrics.csv", rows_csv(history, columns))
            status = f"loss {train_loss:.3f} train {train_acc:.2%} test {test_acc:.2%}"
            if bar is not None:
                bar.update(task, advance=1, status=status)
                if bar.disable:  # not a terminal (a log file): one line per epoch instead of a bar
                    bar.console.print(f"{cfg['net']} epoch {epoch}/{cfg['epochs']} {status} ({epoch_time:.1f} s)")
            if on_epoch is not None:
                on_epoch(row)
    finally:
        if bar is not None:
            bar.stop()

    best = max(history, key=lambda h: h["test_accuracy"])
    summary = {"net": cfg["net"], "recipe": cfg["recipe"], "run": cfg["run"], "epochs": cfg["epochs"],
               "best_epoch": best["epoch"], "best_test_accuracy": best["test_accuracy"],
               "best_test_accuracy_tta": best["test_accuracy_tta"],
               "final_test_accuracy": history[-1]["test_accuracy"], "train_seconds": run_time,
               "total_parameters": n_params, "hparams": cfg["hparams"], "seed": cfg["seed"], "out": str(out)}
    write_json(out / "results.json", summary)
    return summary


def rows_csv(history: list[dict], columns: list[str]) -> str:
    """Rows of dicts as CSV text with ``columns`` in order; ``None`` becomes an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow({k: ("" if h.get(k) is None else h.get(k)) for k in columns})
    return buf.getvalue()


def _check_resume(out: Path, cfg: dict, epochs: int | None) -> dict:
    """The saved run's config (the resumed run must be the same run), with ``--epochs`` allowed to extend it."""
    import json

    if not (out / "config.json").is_file() or not (out / "last.state.pt").is_file():
        raise UserError(f"--resume {out}: no config.json and last.state.pt there (not a cifarbench run folder)")
    saved = json.loads((out / "config.json").read_text())
    if saved.get("net") != cfg["net"]:
        raise UserError(f"--resume {out}: that run trains {saved.get('net')}, not {cfg['net']}")
    read_metadata(out / "last.safetensors")
    resumed = {k: saved[k] for k in cfg}
    if epochs is not None:
        resumed["epochs"] = epochs
    return resumed
