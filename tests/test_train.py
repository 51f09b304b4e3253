"""Training: real torch training on synthetic data, metrics and checkpoints, exact resume, CLI errors."""
import csv
import json

import pytest
import torch

from cifarbench import load_model
from cifarbench.checkpoint import read_metadata
from cifarbench.train import TrainConfig, metric_columns, train
from cli_helpers import assert_user_error, run_cli

DATA = "synthetic:200"


def test_seed_recipe_learns_and_writes_the_report_columns(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "net1", "--set", "l1_oc=6", "--epochs", "3", "--lr", "0.05", "--batch-size", "16",
                           "--data", DATA, "--out", tmp_path / "run", "--json")
    assert code == 0
    summary = json.loads(out)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert list(rows[0]) == metric_columns({"l1_oc": 0, "filter_multiplier": 0, "kernel_size": 0, "stride": 0,
                                            "dropout": 0})
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert summary["best_test_accuracy"] == max(float(r["test_accuracy"]) for r in rows) > 0.3
    best = read_metadata(tmp_path / "run" / "best.safetensors")
    assert best["epoch"] == summary["best_epoch"] and best["seed"] == 0 and "torch" in best["versions"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lr"] == 0.05 and config["batch_size"] == 16 and config["hparams"]["l1_oc"] == 6
    model = load_model(tmp_path / "run")
    assert model.hparams["l1_oc"] == 6 and not model.training


class Interrupt(Exception):
    pass


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig("net4", recipe="fast", hparams={"l1_oc": 4}, epochs=3, batch_size=64, data=DATA, seed=3)
    train(cfg, tmp_path / "straight", show_progress=False)

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "killed", on_epoch=stop_after_two, show_progress=False)
    assert read_metadata(tmp_path / "killed" / "last.safetensors")["epoch"] == 2
    summary = train(cfg, tmp_path / "killed", resume=True, show_progress=False)
    a, b = load_model(tmp_path / "straight" / "last.safetensors"), load_model(tmp_path / "killed" / "last.safetensors")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    straight = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    resumed = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()
    strip = lambda lines: [",".join(l.split(",")[:6]) for l in lines]  # durations differ, results must not
    assert strip(straight) == strip(resumed)
    assert summary["epochs"] == 3


@pytest.mark.parametrize("args,match", [
    (["train", "net7"], "unknown net"),
    (["train", "net1", "--set", "l1_oc"], "expected key=value"),
    (["train", "net1", "--set", "depth=3"], "unknown hyper-parameter"),
    (["train", "net1", "--recipe", "slow"], "unknown recipe"),
    (["train", "net1", "--epochs", "0", "--data", DATA], "must be positive"),
    (["train", "net1", "--data", "/no/such/dir"], "no such file"),
])
def test_bad_train_input_is_one_line_exit_2(capsys, args, match):
    assert_user_error(capsys, *args, match=match)


def test_resume_errors(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "net1", "--set", "l1_oc=4", "--epochs", "1", "--data", DATA,
                         "--out", run)
    assert code == 0
    assert_user_error(capsys, "train", "net2", "--resume", run, "--data", DATA, match="trains net1")
    assert_user_error(capsys, "train", "net1", "--resume", tmp_path, "--data", DATA, match="not a cifarbench run")
    assert_user_error(capsys, "train", "net1", "--data", DATA, "--out", run, match="already holds a run")
    (run / "last.safetensors").write_bytes(b"\0" * 20)
    assert_user_error(capsys, "train", "net1", "--resume", run, "--data", DATA, match="corrupt")
