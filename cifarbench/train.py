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
from .data import Dataset, augment, default_data, load_split
from .errors import UserError
from .io import describe_os_error, write_json, write_text
from .nets import count_parameters
from .zoo import check_hparams, create_model, get_spec

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
#: at most one within-epoch progress event per this many seconds (a bar redraw or a Ray queue message per batch
#: would cost more than it shows)
BATCH_EVENT_S = 0.5
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    net: str
    recipe: str = "seed"
    hparams: dict = field(default_factory=dict)
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    data: str = field(default_factory=default_data)  # $CIFARBENCH_DATA, else cifar10
    data_dir: str | None = None
    seed: int = 0
    device: str | None = None
    run: str = "0"

    def resolved(self) -> dict:
        """Every setting that decides the result, with recipe defaults filled in, each checked (type, range)."""
        if not isinstance(self.recipe, str) or self.recipe not in RECIPES:
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
        _check_int("--epochs", r["epochs"], 1, MAX_EPOCHS)
        _check_int("--batch-size", r["batch_size"], 1, MAX_BATCH)
        _check_int("--seed", self.seed, 0, MAX_SEED)
        # NaN fails every comparison, so `lr <= 0` lets it through: ask for a finite positive number instead
        if isinstance(r["lr"], bool) or not isinstance(r["lr"], (int, float)) or not (math.isfinite(r["lr"])
                                                                                      and r["lr"] > 0):
            raise UserError(f"--lr {r['lr']}: the learning rate must be a finite number > 0")
        if not isinstance(self.data, str):
            raise UserError(f"--data must be a string, got {type(self.data).__name__}")
        return {"net": self.net, "recipe": self.recipe, "hparams": check_hparams(self.net, self.hparams, "--set"),
                "data": _data_source(self.data), "seed": self.seed, "run": str(self.run), **r, "lr": float(r["lr"])}


MAX_EPOCHS, MAX_BATCH, MAX_SEED = 100_000, 65_536, 2**32 - 1


def _check_int(option: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        what = f"must be positive (an integer up to {hi:,})" if lo == 1 else f"must be an integer in {lo}..{hi:,}"
        raise UserError(f"{option} {value}: {what}")


def _data_source(data: str) -> str:
    """A path as an absolute path, so a resumed run finds the same data from any working directory; named sources
    (cifar10, synthetic[:N]) as they are."""
    if data == "cifar10" or data == "synthetic" or data.startswith("synthetic:"):
        return data
    path = Path(data)
    return str(path.resolve()) if path.exists() else data


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
          show_progress: bool = True, on_batch: Callable[[dict], None] | None = None,
          command_line: str | list | None = None) -> dict:
    """Train one run into ``out``; returns the summary also written to ``results.json``.

    Progress: ``show_progress`` draws a bar over every batch of the run (epoch, images/s, ETA) on a terminal, one
    line per epoch elsewhere; ``on_batch`` (what ``sweep`` shows per run) gets ``{"epoch", "batch", "batches",
    "images", "images_per_s"}`` at most every :data:`BATCH_EVENT_S` seconds and at each epoch's last batch;
    ``on_epoch`` gets each finished epoch's metrics row. The summary carries a ``provenance`` block (the
    command line, ``command_line`` or this process's argv; the trained net with the digest of its best
    checkpoint; the training data's identity; device, precision, versions, date).

    ``resume``: continue the run saved in ``out`` from its last finished epoch (from the start when it was stopped
    during epoch 1), with the saved run's settings; ``config`` must agree with them (``--epochs`` may extend the
    run) and the data must have the saved identity, else a :class:`UserError` names what differs."""
    out = Path(out)
    cfg = config.resolved()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    saved, state = None, None
    if resume:
        saved = read_run(out)
        cfg = _check_resume(out, saved, cfg)
        state = _read_resume_state(out)
        if state is not None and state["epoch"] > cfg["epochs"]:
            raise UserError(f"--epochs {cfg['epochs']} is fewer than the {state['epoch']} epochs the saved run "
                            f"has done")
        if cfg["epochs"] != saved["epochs"]:
            _warn_retimed(saved, cfg)
    data_dir = config.data_dir if config.data_dir is not None else (saved or {}).get("data_dir")
    train_set = train_set or load_split(cfg["data"], "train", data_dir)
    test_set = test_set or load_split(cfg["data"], "test", data_dir)
    if saved is not None:
        _check_data(saved, cfg["data"], train_set, test_set)

    model, opt = build(cfg, device)
    torch.backends.cudnn.benchmark = on_gpu  # fixed shapes: let cuDNN pick the fastest kernels once
    steps_per_epoch = math.ceil(len(train_set) / cfg["batch_size"])
    total_steps = steps_per_epoch * cfg["epochs"]
    n_params = count_parameters(model)
    meta_base = {"net": cfg["net"], "hparams": cfg["hparams"], "recipe": cfg["recipe"], "seed": cfg["seed"],
                 "data": train_set.identity.rsplit(":", 1)[0], "versions": versions(), "config": cfg}

    history: list[dict] = []
    start_epoch, run_time, best_acc = 1, 0.0, -1.0
    if state is not None:
        _restore(out / "last.state.pt", state, model, opt, cfg)
        if on_gpu and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        history = state["history"]
        start_epoch, run_time = state["epoch"] + 1, float(state["run_time"])
        best_acc = max((h["test_accuracy"] for h in history), default=-1.0)
    elif saved is None:  # a fresh run (a resumed one stopped in epoch 1 keeps the config.json it has)
        try:
            write_json(out / "config.json", {
                **cfg, "data_identity": train_set.identity, "test_data_identity": test_set.identity,
                "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "device": str(device),
                "versions": versions(), "total_parameters": n_params})
        except OSError as exc:
            raise UserError(f"cannot write the run folder {out}: {describe_os_error(exc)}") from None

    columns = metric_columns(cfg["hparams"])
    train_images, train_labels = train_set.images.to(device), train_set.labels.to(device)
    use_autocast = cfg["autocast"] and on_gpu
    bar = None
    if show_progress:
        from .console import progress

        bar = progress()
        bar.start()
        # counted in batches, so a long epoch moves the bar and its ETA (an epoch-counting bar sat at 0/1)
        task = bar.add_task(f"{cfg['net']} {cfg['recipe']}", total=total_steps,
                            completed=(start_epoch - 1) * steps_per_epoch, status=f"epoch {start_epoch}/{cfg['epochs']}")
    last_event = float("-inf")  # the run's first batch is reported: its speed shows at once
    last_status = ""
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
                now = time.perf_counter()
                if (bar is not None or on_batch is not None) and (now - last_event >= BATCH_EVENT_S
                                                                  or b + 1 == steps_per_epoch):
                    # the time only, never loss.item(): a host sync per batch would slow a GPU run
                    last_event = now
                    seen = min((b + 1) * cfg["batch_size"], len(train_set))
                    rate = seen / max(now - t0, 1e-9)
                    if bar is not None:
                        bar.update(task, completed=step + 1,
                                   status=f"epoch {epoch}/{cfg['epochs']} {rate:,.0f} img/s {last_status}")
                    if on_batch is not None:
                        on_batch({"epoch": epoch, "batch": b + 1, "batches": steps_per_epoch, "images": seen,
                                  "images_per_s": rate})
            train_loss = loss_sum.item() / len(train_set)
            train_acc = correct.item() / len(train_set)
            if not math.isfinite(train_loss):
                raise UserError(f"training diverged at epoch {epoch} (loss {train_loss}); lower --lr")
            epoch_time = time.perf_counter() - t0  # training time only, as the report's "epoch duration"
            run_time += epoch_time
            test_logits, tta_logits = evaluate_logits(model, test_set, device, tta=cfg["recipe"] == "fast",
                                                      autocast=use_autocast)
            # counts, not a float32 mean: a float32 mean of 0/1 is off by ~1e-7, which overfit% (train minus
            # test, both exact fractions otherwise) showed as -1.49e-07 where the two were equal
            test_acc = (test_logits.argmax(1) == test_set.labels).sum().item() / len(test_set)
            tta_acc = None if tta_logits is None else \
                (tta_logits.argmax(1) == test_set.labels).sum().item() / len(test_set)
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
            _write(write_text, out / "metrics.csv", rows_csv(history, columns))
            if saved is not None:
                _record_total(out, cfg["epochs"])
            status = f"loss {train_loss:.3f} train {train_acc:.2%} test {test_acc:.2%}"
            last_status = f"| last epoch: {status}"
            if bar is not None:
                bar.update(task, completed=epoch * steps_per_epoch,
                           status=f"epoch {epoch}/{cfg['epochs']} done {last_status}")
                if bar.disable:  # not a terminal (a log file): one line per epoch instead of a bar
                    bar.console.print(f"{cfg['net']} epoch {epoch}/{cfg['epochs']} {status} ({epoch_time:.1f} s, "
                                      f"{len(train_set) / max(epoch_time, 1e-9):,.0f} img/s)")
            if on_epoch is not None:
                on_epoch(row)
        if saved is not None:  # a resume with nothing left to train (its new total is the epochs done)
            _record_total(out, cfg["epochs"])
    finally:
        if bar is not None:
            bar.stop()

    best = max(history, key=lambda h: h["test_accuracy"])
    summary = {"net": cfg["net"], "recipe": cfg["recipe"], "run": cfg["run"], "epochs": cfg["epochs"],
               "best_epoch": best["epoch"], "best_test_accuracy": best["test_accuracy"],
               "best_test_accuracy_tta": best["test_accuracy_tta"],
               "final_test_accuracy": history[-1]["test_accuracy"], "train_seconds": run_time,
               "total_parameters": n_params, "hparams": cfg["hparams"], "seed": cfg["seed"], "out": str(out)}
    from .checkpoint import file_sha256
    from .provenance import provenance

    best_file = out / "best.safetensors"
    summary["provenance"] = provenance(
        command_line=command_line,
        data={"identity": train_set.identity, "images": len(train_set), "test_identity": test_set.identity,
              "test_images": len(test_set)},
        backend="torch", precision="amp" if use_autocast else "fp32", device=device,
        extra={"recipe": cfg["recipe"], "seed": cfg["seed"],
               # the model this run made: its best checkpoint, by content
               "model": {"name": cfg["net"], "kind": "checkpoint", "path": str(best_file),
                         "digest": file_sha256(best_file)}})
    _write(write_json, out / "results.json", summary)
    return summary


def _write(writer, path: Path, content) -> None:
    try:
        writer(path, content)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {describe_os_error(exc)}") from None


def rows_csv(history: list[dict], columns: list[str]) -> str:
    """Rows of dicts as CSV text with ``columns`` in order; ``None`` becomes an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow({k: ("" if h.get(k) is None else h.get(k)) for k in columns})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ resume
# config.json's keys and what each must be: a run folder written by hand, truncated or from another tool is refused
# in one line instead of failing somewhere inside training
_NUMBER = (int, float)
RUN_FIELDS: dict[str, tuple] = {
    "net": (str,), "recipe": (str,), "hparams": (dict,), "data": (str,), "seed": (int,), "run": (str,),
    "lr": _NUMBER, "batch_size": (int,), "momentum": _NUMBER, "nesterov": (bool,), "weight_decay": _NUMBER,
    "label_smoothing": _NUMBER, "schedule": (str,), "warmup": _NUMBER, "jitter": _NUMBER, "autocast": (bool,),
    "epochs": (int,), "augment": (bool,), "data_identity": (str,),
}
# the setting each command-line option decides, for naming the option that contradicts a saved run
RESUME_OPTIONS = (("recipe", "--recipe"), ("lr", "--lr"), ("batch_size", "--batch-size"), ("seed", "--seed"))


def read_run(out: str | Path) -> dict:
    """A run folder's ``config.json``, checked: a JSON object with every setting of the run, each of its type and
    range (the same checks as a new run's options)."""
    import json

    out = Path(out)
    path = out / "config.json"
    if not path.is_file():
        raise UserError(f"--resume {out}: no config.json there (not a cifarbench run folder)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--resume {out}: config.json is corrupt ({type(exc).__name__}); the run cannot be "
                        f"resumed") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume {out}: config.json is corrupt (a JSON {type(saved).__name__}, not an object)")
    for key, kinds in RUN_FIELDS.items():
        if key not in saved:
            raise UserError(f"--resume {out}: config.json is incomplete (no {key})")
        value = saved[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"--resume {out}: config.json has {key}={value!r}, not a valid "
                            f"{' or '.join(k.__name__ for k in kinds)}")
    if saved["schedule"] not in ("constant", "onecycle"):
        raise UserError(f"--resume {out}: config.json has an unknown schedule {saved['schedule']!r}")
    if saved.get("data_dir") is not None and not isinstance(saved["data_dir"], str):
        raise UserError(f"--resume {out}: config.json has data_dir={saved['data_dir']!r}, not a path")
    if saved.get("test_data_identity") is not None and not isinstance(saved["test_data_identity"], str):
        raise UserError(f"--resume {out}: config.json has test_data_identity={saved['test_data_identity']!r}")
    try:  # the same checks a new run's options get (known net and recipe, hyper-parameter ranges, finite lr)
        saved["hparams"] = TrainConfig(saved["net"], recipe=saved["recipe"], hparams=saved["hparams"],
                                       epochs=saved["epochs"], lr=saved["lr"], batch_size=saved["batch_size"],
                                       data=saved["data"], seed=saved["seed"]).resolved()["hparams"]
    except UserError as exc:
        raise UserError(f"--resume {out}: config.json is invalid: {exc}") from None
    return saved


def resume_config(out: str | Path, net: str, *, hparams: dict | None = None, data_dir: str | None = None,
                  device: str | None = None, **given) -> TrainConfig:
    """The saved run's config with the options the user gave (``given``: recipe, lr, batch_size, epochs, data,
    seed; ``hparams`` from ``--set``) applied over it, for :func:`train` to check against the saved run: an option
    that repeats the saved value is fine, one that contradicts it fails there, naming the option."""
    saved = read_run(out)
    if net != saved["net"]:
        raise UserError(f"--resume {out}: that run trains {saved['net']}, not {net}")
    settings = {k: given.get(k, saved[k]) for k in ("recipe", "lr", "batch_size", "epochs", "data", "seed")}
    return TrainConfig(saved["net"], hparams={**saved["hparams"], **(hparams or {})}, data_dir=data_dir,
                       device=device, run=saved["run"], **settings)


def _check_resume(out: Path, saved: dict, cfg: dict) -> dict:
    """The settings of the resumed run: the saved run's, all of them (so a changed recipe table in a new
    cifarbench cannot change a resumed run), with ``--epochs`` allowed to extend it; any other disagreement of
    ``cfg`` with the saved run is an error naming the option."""
    if cfg["net"] != saved["net"]:
        raise UserError(f"--resume {out}: that run trains {saved['net']}, not {cfg['net']}")
    for key, option in RESUME_OPTIONS:
        if cfg[key] != saved[key]:
            raise UserError(f"{option} {cfg[key]} contradicts the saved run's {key} {saved[key]} (in {out}); "
                            f"a resumed run keeps its settings: omit {option}")
    for key, value in cfg["hparams"].items():
        if saved["hparams"].get(key) != value:
            raise UserError(f"--set {key}={value} contradicts the saved run's {key}={saved['hparams'].get(key)} "
                            f"(in {out}); a resumed run keeps its settings: omit --set")
    if cfg["data"] != saved["data"] and "cifar10" in (cfg["data"], saved["data"]):
        # other data than the official set, or the official set for other data: no need to load (download) it
        raise UserError(f"--data {cfg['data']} contradicts the saved run's data {saved['data']} (in {out}); "
                        f"omit --data to resume on the run's own data")
    if (out / "last.safetensors").is_file():
        read_metadata(out / "last.safetensors")
    resumed = {k: saved[k] for k in cfg}
    resumed["epochs"] = cfg["epochs"]
    resumed["data"] = cfg["data"]  # the same data (checked by identity once loaded), maybe from a new path
    return resumed


def _warn_retimed(saved: dict, cfg: dict) -> None:
    """``--resume --epochs N`` with N other than the saved run's total: a schedule over the whole run (one-cycle)
    is stretched over the new total, so the learning rate from here on is not the one the saved epochs ran with:
    said, since the result is then no longer the run a fresh N-epoch run gives."""
    if cfg["schedule"] != "constant":
        from .errors import warn

        warn(f"changing the run's total from {saved['epochs']} to {cfg['epochs']} epochs re-times its "
             f"{cfg['schedule']} learning-rate schedule over {cfg['epochs']} epochs from here on; the result "
             f"differs from a run trained for {cfg['epochs']} epochs from the start")


def _record_total(out: Path, epochs: int) -> None:
    """config.json takes a resumed run's new total once its first epoch is saved (not before: a resume that fails
    on its data or a write leaves the run as it was), so a later plain ``--resume`` continues this run rather than
    refusing as if asked for fewer epochs than it has done."""
    import json

    path = out / "config.json"
    raw = json.loads(path.read_text())
    if raw.get("epochs") != epochs:
        raw["epochs"] = epochs
        _write(write_json, path, raw)


def _check_data(saved: dict, data: str, train_set: Dataset, test_set: Dataset) -> None:
    """The data loaded for a resumed run is the data it trained on: the same identity (helper of the data layer:
    a content digest for files), for the training split and, when recorded, the test split."""
    for what, now, then in (("training", train_set.identity, saved["data_identity"]),
                            ("test", test_set.identity, saved.get("test_data_identity"))):
        if then is not None and now != then:
            if data == saved["data"]:
                raise UserError(f"the saved run's {what} data {data} has changed since it trained (identity now "
                                f"{now}, then {then}); the run cannot be resumed exactly")
            raise UserError(f"--data {data} is not the data the saved run trained on ({what} identity {now}, saved "
                            f"{then}); omit --data to resume on the run's own data")


def _read_resume_state(out: Path) -> dict | None:
    """The last finished epoch's state, or None for a run stopped during epoch 1 (nothing but its config.json:
    it starts again from epoch 0, which gives exactly the uninterrupted run)."""
    path = out / "last.state.pt"
    if not path.is_file():
        if (out / "metrics.csv").is_file() or (out / "results.json").is_file():
            raise UserError(f"--resume {out}: last.state.pt is missing but epochs were finished; the run cannot be "
                            f"resumed exactly (start a new run)")
        return None
    state = load_state(path)
    problem = _state_problem(state)
    if problem:
        raise UserError(f"{path} is not a valid cifarbench training state: {problem}")
    return state


def _state_problem(state) -> str | None:
    """What is wrong with a training state's structure (before it meets the model), or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    for key, kinds in (("model", dict), ("optimizer", dict), ("epoch", int), ("run_time", (int, float)),
                       ("rng_cpu", torch.Tensor), ("history", list)):
        if key not in state:
            return f"no {key}"
        if isinstance(state[key], bool) or not isinstance(state[key], kinds):
            return f"{key} is {state[key]!r:.60}, not a {getattr(kinds, '__name__', 'number')}"
    epoch, history = state["epoch"], state["history"]
    if not 1 <= epoch <= MAX_EPOCHS:
        return f"epoch {epoch} is out of range"
    if len(history) != epoch or not all(isinstance(h, dict) and isinstance(h.get("test_accuracy"), float)
                                        for h in history):
        return f"its history does not hold one row per finished epoch ({epoch})"
    if not (math.isfinite(state["run_time"]) and state["run_time"] >= 0):
        return f"run_time {state['run_time']} is not a duration"
    rng = state["rng_cpu"]
    if rng.dtype != torch.uint8 or tuple(rng.shape) != tuple(torch.get_rng_state().shape):
        return "rng_cpu is not a CPU random-generator state"
    if "rng_cuda" in state and not (isinstance(state["rng_cuda"], torch.Tensor) and state["rng_cuda"].dtype ==
                                    torch.uint8):
        return "rng_cuda is not a CUDA random-generator state"
    opt = state["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        return "its optimizer holds no state and param_groups"
    return None


def _restore(path: Path, state: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: dict) -> None:
    """Load a checked state into the model and optimizer after checking it fits them: every weight's name and shape,
    the optimizer's groups and every momentum buffer's shape (torch would accept a wrong-shaped buffer and fail, or
    silently broadcast, steps later)."""
    def bad(why: str):
        return UserError(f"{path} is not a valid cifarbench training state for {cfg['net']} {cfg['hparams']}: {why}")

    if state["epoch"] > cfg["epochs"]:
        raise UserError(f"--epochs {cfg['epochs']} is fewer than the {state['epoch']} epochs the saved run has done")
    own = model.state_dict()
    weights = state["model"]
    if set(weights) != set(own):
        raise bad(f"its weights are named {sorted(set(weights) ^ set(own))[:3]} where the net differs")
    for key, ref in own.items():
        if not isinstance(weights[key], torch.Tensor) or tuple(weights[key].shape) != tuple(ref.shape):
            raise bad(f"{key} has shape {list(getattr(weights[key], 'shape', []))}, the net needs {list(ref.shape)}")
    groups, saved_groups = opt.param_groups, state["optimizer"]["param_groups"]
    if len(saved_groups) != len(groups) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(own_g["params"])
            for g, own_g in zip(saved_groups, groups)):
        raise bad("its optimizer has other parameter groups than the net's")
    by_id = {pid: p for g, own_g in zip(saved_groups, groups) for pid, p in zip(g["params"], own_g["params"])}
    for pid, entry in state["optimizer"]["state"].items():
        if pid not in by_id or not isinstance(entry, dict):
            raise bad(f"its optimizer state names parameter {pid!r}, which the net lacks")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != tuple(by_id[pid].shape):
                raise bad(f"its optimizer's {name} for parameter {pid} has shape {list(value.shape)}, the parameter "
                          f"{list(by_id[pid].shape)}")
    try:
        model.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise bad(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
