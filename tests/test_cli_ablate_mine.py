"""`cifarbench ablate` and `cifarbench mine` end to end, in-process, on a small checkpoint and synthetic data."""
from __future__ import annotations

import csv
import json

import pytest

from cifarbench.checkpoint import save_checkpoint
from cli_helpers import assert_user_error, run_cli
from conftest import random_model

DATA = ("--data", "synthetic:200", "--backend", "torch")  # 40 test images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model("net1")
    path = tmp_path_factory.mktemp("ckpt") / "net1.safetensors"
    save_checkpoint(path, model, {"net": "net1", "hparams": model.hparams})
    return path


def test_ablate_json_and_files(ckpt, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "ablate", ckpt, "--filters", "conv1:0,1", "conv2:0,1", *DATA,
                           "--out", tmp_path, "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"filters", "before", "after", "difference", "confusion", "flipped", "provenance"}
    assert result["filters"] == [{"layer": "conv1", "filter": 0}, {"layer": "conv1", "filter": 1},
                                 {"layer": "conv2", "filter": 0}, {"layer": "conv2", "filter": 1}]
    assert 0 <= result["before"]["accuracy"] <= 1 and len(result["confusion"]["after"]) == 10
    assert sum(map(sum, result["confusion"]["before"])) == 40
    for name in ("per_class.csv", "confusion_before.csv", "confusion_after.csv", "confusion_diff.csv",
                 "confusion.png", "flipped.png", "ablation.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.reader((tmp_path / "per_class.csv").open()))
    assert rows[-1][0] == "overall" and len(rows) == 12
    assert float(rows[-1][1]) == pytest.approx(result["before"]["accuracy"])
    # the diff's cells are after - before, and its corner says so
    diff = list(csv.reader((tmp_path / "confusion_diff.csv").open()))
    assert "after - before" in diff[0][0]
    assert [[int(v) for v in r[1:]] for r in diff[1:]] == \
        [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(result["confusion"]["after"], result["confusion"]["before"])]


def test_ablate_sweep(ckpt, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "ablate", ckpt, "--sweep", "conv1", *DATA, "--out", tmp_path, "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["filters"]) == 18 and result["layers"] == ["conv1"]
    assert {"rank", "layer", "filter", "accuracy", "drop", "largest_gain", "largest_loss"} <= set(result["filters"][0])
    assert all((tmp_path / n).is_file() for n in ("sweep.csv", "sweep.json", "sweep.png"))


def test_mine_json_and_files(ckpt, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "mine", ckpt, "--filters", "conv1:0", "conv2:3", "--top", "4", "--show", "2",
                           *DATA, "--out", tmp_path, "--json")
    assert code == 0
    result = json.loads(out)
    assert [(f["layer"], f["filter"]) for f in result["filters"]] == [("conv1", 0), ("conv2", 3)]
    assert len(result["filters"][0]["top"]) == 4
    assert result["receptive_fields"] == {"conv1": 3, "conv2": 8}
    assert (tmp_path / "filters" / "conv1_filter0.png").is_file()
    for name in ("top_images.csv", "class_histogram.csv", "responses.csv", "receptive_fields.csv",
                 "dead_filters.csv", "mining.json"):
        assert (tmp_path / name).is_file(), name


def test_mine_all_through_onnxruntime(ckpt, capsys):
    code, out, _ = run_cli(capsys, "mine", ckpt, "--all", "--top", "3", "--data", "synthetic:200",
                           "--backend", "onnxruntime", "--json")
    assert code == 0
    assert len(json.loads(out)["filters"]) == 18 + 36


@pytest.mark.parametrize("args, match", [
    (("ablate", "--filters", "conv9:0"), "unknown layer"),
    (("ablate", "--filters", "conv1:18"), "out of range"),
    (("ablate", "--filters", "conv1-0"), "malformed"),
    (("ablate", "--sweep", "conv5"), "unknown layer"),
    (("ablate", "--sweep", "conv1", "--filters", "conv1:0"), "not both"),
    (("mine", "conv1:a"), "malformed"),
    (("mine", "--top", "0"), "--top"),
    (("mine", "--all", "conv1:0"), "not both"),
    (("ablate", "--limit", "0"), "--limit"),
])
def test_bad_input_is_one_line_exit_2(ckpt, capsys, args, match):
    assert_user_error(capsys, args[0], ckpt, *args[1:], *DATA, match=match)


def test_missing_model(capsys, tmp_path):
    assert_user_error(capsys, "mine", tmp_path / "nope.safetensors", *DATA, match="no such")
