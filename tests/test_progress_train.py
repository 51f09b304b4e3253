"""Progress within epochs (issue 15): ``train`` reports batches with images/s (throttled, never skipping an epoch's
last batch), ``sweep`` forwards them per run to its live table, and a log (stderr not a terminal) gets one line per
epoch with its speed. Real training on synthetic data."""
from __future__ import annotations

import io
import math

from rich.console import Console

from cifarbench import train as train_mod
from cifarbench.commands.sweep import Board
from cifarbench.sweep import claim, plan, run_sweep
from cifarbench.train import TrainConfig, train
from cli_helpers import run_cli

DATA = "synthetic:200"


def test_every_batch_is_reported_when_unthrottled(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "BATCH_EVENT_S", 0.0)
    events = []
    cfg = TrainConfig("net1", hparams={"l1_oc": 3}, epochs=2, batch_size=48, data=DATA, seed=0)
    train(cfg, tmp_path / "run", on_batch=events.append, show_progress=False)
    batches = math.ceil(200 / 48)   # 5: four full batches and one of 8
    assert [(e["epoch"], e["batch"]) for e in events] == [(ep, b) for ep in (1, 2) for b in range(1, batches + 1)]
    assert all(e["batches"] == batches for e in events)
    assert [e["images"] for e in events[:batches]] == [48, 96, 144, 192, 200]
    assert all(e["images_per_s"] > 0 and math.isfinite(e["images_per_s"]) for e in events)


def test_throttled_events_still_end_every_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "BATCH_EVENT_S", 3600.0)  # nothing but the forced end-of-epoch events
    events = []
    cfg = TrainConfig("net1", hparams={"l1_oc": 3}, epochs=3, batch_size=16, data=DATA, seed=0)
    train(cfg, tmp_path / "run", on_batch=events.append, show_progress=False)
    # the first batch of the run passes the throttle (no event yet); then only each epoch's last
    assert [(e["epoch"], e["batch"]) for e in events] == [(1, 1), (1, 13), (2, 13), (3, 13)]


def test_sweep_forwards_batches_per_run_before_its_epoch_row(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "BATCH_EVENT_S", 0.0)
    trials = plan("net1", {"lr": [0.05, 0.02], "l1_oc": [3]}, tmp_path / "sweep", epochs=1, data=DATA, seed=1)
    claim(trials)
    batches = math.ceil(200 / trials[0].config.resolved()["batch_size"])
    events = []
    run_sweep(trials, on_event=lambda kind, t, p: events.append((kind, t.index, p and p.get("batch"))))
    assert events == [e for i in (0, 1) for e in
                      [("start", i, None), *[("batch", i, b) for b in range(1, batches + 1)], ("epoch", i, None),
                       ("finish", i, None)]]


def test_live_table_shows_the_epoch_under_way_with_its_batch_and_speed(tmp_path):
    trials = plan("net1", {"lr": [0.05, 0.02], "l1_oc": [3]}, tmp_path / "sweep", epochs=4, data=DATA, seed=1)
    board = Board(trials, Console(file=io.StringIO(), width=200, force_terminal=False))
    board.update("start", trials[0], None)
    board.update("epoch", trials[0], {"epoch": 1, "loss": 2.0, "train_accuracy": 0.2, "test_accuracy": 0.25})
    board.update("batch", trials[0], {"epoch": 2, "batch": 3, "batches": 13, "images": 48,
                                      "images_per_s": 1234.5})
    table = board.table()
    cells = {col.header: col._cells[0] for col in table.columns}   # run 0's row
    assert (cells["status"], cells["epoch"], cells["batch"], cells["img/s"]) == ("running", "2/4", "3/13", "1,234")
    assert cells["test acc"] == "25.00%"
    board.update("epoch", trials[0], {"epoch": 2, "loss": 1.5, "train_accuracy": 0.3, "test_accuracy": 0.35})
    board.update("batch", trials[0], {"epoch": 2, "batch": 13, "batches": 13, "images": 200, "images_per_s": 999})
    cells = {col.header: col._cells[0] for col in board.table().columns}
    assert (cells["epoch"], cells["batch"]) == ("2/4", "")  # a finished epoch shows as finished


def test_train_log_has_one_line_per_epoch_with_its_speed(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "net1", "--set", "l1_oc=3", "--epochs", "2", "--batch-size", "50",
                           "--data", DATA, "--out", tmp_path / "run")
    assert code == 0, err
    lines = [line for line in err.splitlines() if " epoch " in line and "img/s" in line]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"], err
