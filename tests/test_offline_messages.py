"""Offline defaults and the messages that fix them (issue 15): ``train`` reads ``$CIFARBENCH_DATA`` like every other
command and records provenance; a missing test set fails ``export --to onnx-int8`` before anything is written and
names ``--data``/``--eval-images 0``; missing calibration images name ``--calib-data``, never ``--data``."""
from __future__ import annotations

import hashlib
import json
import urllib.error

import pytest

from cli_helpers import run_cli


def test_train_default_data_comes_from_cifarbench_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFARBENCH_DATA", "synthetic:200")
    code, stdout, err = run_cli(capsys, "train", "net1", "--set", "l1_oc=3", "--epochs", "1", "--out",
                                tmp_path / "run", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == "synthetic:200"
    prov = doc["provenance"]
    assert prov["command"].startswith("cifarbench train net1") and "--epochs 1" in prov["command"]
    best = tmp_path / "run" / "best.safetensors"
    assert prov["model"]["name"] == "net1" and prov["model"]["digest"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert prov["data"]["identity"].startswith("synthetic:200") and prov["data"]["images"] > 0
    assert prov["backend"] == "torch" and prov["device"] == "cpu" and prov["date"] and prov["cifarbench"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["provenance"] == prov


def test_int8_export_without_test_data_fails_first_and_names_the_fixes(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "export", "net1", "--to", "onnx-int8", "--out", out, "--data",
                           str(tmp_path / "missing.tar.gz"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "--eval-images 0" in lines[0] and "accuracy check" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []   # nothing written, no calibration spent


def test_calibration_offline_names_calib_data_not_data(tmp_path, monkeypatch):
    """The download failing (as offline) while reading calibration images: the fix named is --calib-data."""
    import torchvision.datasets

    from cifarbench.errors import UserError
    from cifarbench.export.int8 import calibration_images

    def offline(*args, download=False, **kwargs):
        if download:
            raise urllib.error.URLError("no network")
        raise RuntimeError("Dataset not found or corrupted.")  # what torchvision says of an empty folder

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError) as info:
        calibration_images("cifar10", 8, data_dir=tmp_path / "empty")
    message = str(info.value)
    assert message.startswith("INT8 calibration:") and "--calib-data PATH" in message
    assert "CIFARBENCH_CALIB_DATA" in message and "--data PATH" not in message


def test_a_negative_eval_images_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "export", "net1", "--to", "onnx-int8", "--out", out, "--eval-images", "-3")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines == ["error: --eval-images must be 0 (no accuracy check) or more, got -3"]
    assert not out.exists()
