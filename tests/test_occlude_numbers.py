"""Occlusion numbers that must never be silently wrong: non-finite logits are refused (never a map of NaNs with a
"most damaging" patch), JSON stays strict JSON, the CSV holds the map's float32 values exactly, a model that
already outputs probabilities is flagged; the API's inputs (batches, K, targets, keywords) are normalized once at
the entry or refused, and the caller's module is never changed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_cli
from occlusion_reference import naive_map
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


# ------------------------------------------------------------------ the API's inputs, normalized once at the entry
from cifarbench.analysis.occlusion import make_engine, occlusion_maps  # noqa: E402
from cifarbench.artifacts import open_runtime  # noqa: E402


@pytest.fixture
def batch():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_batches_in_other_forms_give_the_definitions_maps(batch):
    model = Small().eval()
    engine = make_engine(model, 8, 8, mode="dense", backend="torch", device="cpu")
    want = [naive_map(model, batch[b], 8, 8, t)[0] for b, t in enumerate((1, 5, 9))]
    for images, targets in ((batch.numpy(), torch.tensor([1, 5, 9])),
                            (batch.clone().requires_grad_(), np.array([1, 5, 9])),
                            (batch, [1.0, np.int64(5), torch.tensor(9)])):
        got = occlusion_maps(engine, images, 8.0, stride=np.int64(8), targets=targets)
        assert [r.target for r in got] == [1, 5, 9]
        for r, w in zip(got, want):
            assert np.abs(r.map - w).max() <= 1e-6
    (one,) = occlusion_maps(engine, batch[:1], 8, stride=8, targets=torch.tensor(5))
    assert one.target == 5
    assert occlusion_maps(engine, batch[:0], 8, stride=8) == []


@pytest.mark.parametrize("images,match", [
    (lambda b: (b * 255).to(torch.uint8), "float pixels"), (lambda b: b * 255, "divide by 255"),
    (lambda b: b.masked_fill(b > 0.99, float("nan")), "NaN"), (lambda b: b[:, :1], "expected"),
])
def test_batches_that_are_not_pixels_in_0_1_are_refused(batch, images, match):
    engine = make_engine(Small().eval(), 8, 8, mode="dense", backend="torch", device="cpu")
    with pytest.raises(UserError, match=match):
        occlusion_maps(engine, images(batch), 8, stride=8)
    with pytest.raises(UserError, match="0, 1"):
        open_runtime(Small().eval(), "torch", device="cpu").logits(batch * 255)


@pytest.mark.parametrize("k,stride", [(8.5, 1), ("8", 1), (8, 1.5), (True, 1)])
def test_a_window_that_is_not_a_whole_number_is_one_line(image, k, stride):
    with pytest.raises(UserError, match="whole number"):
        occlusion_map(Small(), image, k, stride=stride, backend="torch", device="cpu")


def test_an_unknown_keyword_is_refused_not_ignored(image):
    with pytest.raises(TypeError, match="label.*did you mean target"):
        occlusion_map(Small(), image, 8, label="dog")
    with pytest.raises(TypeError, match="foo"):
        open_runtime(Small(), "torch", foo=1)


@pytest.mark.parametrize("mode", ["dense", "incremental"])
def test_the_callers_module_is_never_changed(image, mode):
    """A float64 module in training mode: the analyses run a float32 eval copy; the caller's stays float64, in
    training mode, contiguous and on its device, and the map is the float32 eval model's (by hand)."""
    model = Small().double().train()
    r = occlusion_map(model, image, 8, stride=8, mode=mode, backend="torch", device="cpu")
    open_runtime(model, "torch", device="cpu").logits(image[None])
    assert model.training and all(p.dtype == torch.float64 for p in model.parameters())
    assert model.conv.weight.is_contiguous()
    reference = Small().eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        target = int(reference(image[None]).argmax())
    assert np.abs(r.map - naive_map(reference, image, 8, 8, target)[0]).max() <= 1e-5


def test_a_float32_eval_module_is_not_changed_either(image):
    """The common case: the torch runtime runs its own channels-last copy, never the caller's module."""
    model = Small().eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = open_runtime(model, "torch", device="cpu")
    runtime.logits(image[None])
    occlusion_map(model, image, 8, stride=8, mode="incremental", backend="torch", device="cpu")
    assert runtime.torch_module() is not model and model.conv.weight.is_contiguous()
    assert not model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_numpy_sizes_and_torchs_cpu_0_are_taken(image):
    model = Small().eval()
    r = occlusion_map(model, torch.rand(3, 48, 48), np.int64(16), stride=np.int64(16), device="cpu:0",
                      input_size=np.int64(48), backend="torch")
    assert r.map.shape == (3, 3)


def test_a_contract_given_with_an_opened_model_is_refused_not_dropped(image):
    runtime = open_runtime(Small().eval(), "torch", device="cpu")
    with pytest.raises(UserError, match="apply when a model is opened"):
        occlusion_map(runtime, image, 8, stride=8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_none_in_a_target_list_is_that_images_prediction(batch):
    model = Small().eval()
    engine = make_engine(model, 8, 8, mode="dense", backend="torch", device="cpu")
    with torch.no_grad():
        predicted = int(model(batch[:1]).argmax())
    first, second = occlusion_maps(engine, batch[:2], 8, stride=8, targets=[None, 3])
    assert (first.target, second.target) == (predicted, 3)
    assert np.abs(first.map - naive_map(model, batch[0], 8, 8, predicted)[0]).max() <= 1e-6
    with pytest.raises(UserError, match="3 targets for 2 images"):
        occlusion_maps(engine, batch[:2], 8, stride=8, targets=[1, 2, 3])


def test_digits_among_numeric_class_names_are_names_only():
    from cifarbench.analysis.occlusion import resolve_target

    numeric = [str(i) for i in range(1, 11)]
    assert resolve_target("3", numeric) == 2 and resolve_target(3, numeric) == 3
    with pytest.raises(UserError, match="unknown class"):
        resolve_target("0", numeric)  # not a class name; read as an index it would be class "1"
    assert resolve_target("0", [f"c{i}" for i in range(10)]) == 0  # names that are not numbers: an index
