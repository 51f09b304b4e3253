"""Occlusion numbers that must never be silently wrong: non-finite logits are refused (never a map of NaNs with a
"most damaging" patch), JSON stays strict JSON, the CSV holds the map's float32 values exactly, a model that
already outputs probabilities is flagged, and the API leaves a caller's module in the mode it came in."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_cli
from PIL import Image
from torch import nn

from cifarbench.analysis.occlusion import occlusion_map
from cifarbench.errors import UserError
from cifarbench.io import to_json


class Small(nn.Module):
    def __init__(self, classes: int = 10, softmax: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, classes)
        self.softmax = softmax

    def forward(self, x):
        y = self.fc(self.drop(self.conv(x).relu().mean((2, 3))))
        return y.softmax(1) if self.softmax else y


class NaNOnGray(Small):
    """Finite on the clean image, NaN wherever the gray patch (0.5 everywhere in it) lands at the top left."""

    def forward(self, x):
        y = super().forward(x)
        hit = (x[:, :, :4, :4] == 0.5).flatten(1).all(1)
        return torch.where(hit[:, None], torch.full_like(y, float("nan")), y)


@pytest.fixture
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.4


def test_non_finite_logits_are_one_line_not_a_map(image):
    with pytest.raises(UserError, match="non-finite logits.*occluded"):
        occlusion_map(NaNOnGray(), image, 8, stride=8, mode="dense", backend="torch", device="cpu")
    bad = Small()
    with torch.no_grad():
        bad.fc.bias[3] = float("nan")
    with pytest.raises(UserError, match="non-finite logits.*clean image"):
        occlusion_map(bad, image, 8, stride=8, backend="torch", device="cpu")


def test_json_is_strict_nan_and_infinity_become_null():
    text = to_json({"a": float("nan"), "b": [1.5, float("inf"), np.float32("-inf")], "c": np.array([0.25, np.nan])})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}")) == \
        {"a": None, "b": [1.5, None, None], "c": [0.25, None]}


def test_tiny_std_is_refused_before_it_overflows(tmp_path, capsys):
    Image.new("RGB", (32, 32), (10, 200, 90)).save(tmp_path / "a.png")
    assert_user_error(capsys, "occlude", tmp_path / "a.png", "--model", "net1", "--mean", "0.5,0.5,0.5", "--std",
                      "1e-45,1,1", "--out", tmp_path / "o", match="--std")


def test_csv_holds_the_float32_map_exactly(tmp_path, capsys):
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    code, out, err = run_cli(capsys, "occlude", tmp_path / "a.png", "--k", "8", "--stride", "4", "--no-figures",
                             "--json", "--out", tmp_path / "o")
    assert code == 0, err
    npy = np.load(tmp_path / "o" / "a_k8.npy")
    csv = np.loadtxt(tmp_path / "o" / "a_k8.csv", delimiter=",", dtype=np.float64)
    assert np.array_equal(csv.astype(np.float32), npy)


def test_a_model_that_outputs_probabilities_is_flagged_once(image, capsys):
    capsys.readouterr()
    occlusion_map(Small(softmax=True), image, 8, stride=8, mode="dense", backend="torch", device="cpu")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "probabilities, not logits" in err
    occlusion_map(Small(), image, 8, stride=8, mode="dense", backend="torch", device="cpu")
    assert "warning:" not in capsys.readouterr().err


def test_the_api_puts_a_training_module_back_in_training_mode(image):
    model = Small().train()
    r = occlusion_map(model, image, 8, stride=8, backend="torch", device="cpu")
    assert model.training and model.drop.training
    # the map itself is of the model in eval mode (no dropout): the definition, by hand
    model.eval()
    with torch.no_grad():
        clean = torch.softmax(model(image[None]), 1)[0]
        x = image.clone()
        x[:, 8:16, 16:24] = 0.5
        p = torch.softmax(model(x[None]), 1)[0, int(clean.argmax())]
    assert math.isclose(float(r.map[1, 2]), float(p), abs_tol=1e-6)
