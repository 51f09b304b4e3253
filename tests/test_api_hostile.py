"""The Python API as a notebook uses it, against the definitions: models that write into their input, modules
that cannot be copied, class names that differ in case or come as a set, huge batches, stray approx knobs, hand-made
filter selections. Maps against occlusion_reference.naive_map."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarbench import load_model, occlusion_map, open_runtime
from cifarbench.errors import UserError
from cifarbench.source import resolve_source
from occlusion_reference import naive_map


class InPlace(nn.Module):
    """Normalizes its input in place and uses in-place activations whose results it does not assign."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x.sub_(0.5).div_(0.25)
        y = self.c1(x)
        y.relu_()
        z = self.c2(y)
        z += y
        F.relu(z, inplace=True)
        z = torch.max_pool2d(z, 2)
        return self.fc(z.mean((2, 3)))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c1(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["dense", "incremental", "auto"])
def test_a_model_that_writes_into_its_input_gets_exact_maps_and_leaves_the_image_alone(mode):
    model = InPlace().eval()
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    kept = image.clone()
    ref, target = naive_map(model, image, 8, 4)
    assert torch.equal(image, kept)  # the reference itself copies
    r = occlusion_map(model, image, k=8, stride=4, mode=mode)
    assert torch.equal(image, kept)
    assert r.target == target
    np.testing.assert_allclose(r.map, ref, atol=1e-5)
    if mode != "dense":
        assert r.engine["engine"] == "incremental-graph"  # in-place ops and torch.max_pool2d are in the IR


def test_runtime_logits_never_writes_into_the_callers_batch():
    batch = torch.rand(4, 3, 32, 32)
    kept = batch.clone()
    logits = open_runtime(InPlace().eval(), backend="torch", device="cpu").logits(batch)
    assert torch.equal(batch, kept)
    with torch.no_grad():
        np.testing.assert_allclose(logits, InPlace().eval()(kept.clone()), atol=1e-5)


def test_a_huge_batch_runs_in_bounded_chunks_with_the_same_logits():
    """An expand()ed view of 20,000 images: chunked (never materialized whole), each row the single image's."""
    rt = open_runtime("net1", backend="torch", device="cpu")
    one = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = rt.logits(one.expand(20_000, 3, 32, 32))
    assert out.shape == (20_000, 10) and out.dtype == torch.float32
    np.testing.assert_allclose(out[[0, 4095, 4096, 19_999]], rt.logits(one).expand(4, 10), atol=1e-4)


def test_a_module_that_cannot_be_copied_is_refused_not_changed():
    model = Small().eval()
    model.lock = threading.Lock()
    strides = model.c1.weight.stride()
    with pytest.raises(UserError, match="cannot be copied"):
        open_runtime(model, backend="torch", device="cpu")
    assert model.c1.weight.stride() == strides and not model.training


def test_the_bench_module_path_keeps_the_callers_training_mode():
    from cifarbench.runtime import resolve_module

    model = Small().train()
    module = resolve_module(model)
    assert model.training and not module.training and module is not model


def test_class_names_that_differ_in_case_resolve_exactly():
    names = list("abcdefghi") + ["A"]
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    r = occlusion_map(Small().eval(), image, k=8, stride=8, classes=names, target="A", mode="dense")
    assert r.target == 9
    ref, _ = naive_map(Small().eval(), image, 8, 8, target=9)
    np.testing.assert_allclose(r.map, ref, atol=1e-5)
    with pytest.raises(UserError, match="when case is ignored"):
        occlusion_map(Small().eval(), image, k=8, stride=8, classes=["Cat", "cat"] + list("abcdefgh"),
                      target="CAT", mode="dense")


@pytest.mark.parametrize("unordered", [set, frozenset, lambda names: dict.fromkeys(names).keys()])
def test_class_names_without_an_order_are_refused(unordered):
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with pytest.raises(UserError, match="output order"):
        resolve_source(Small().eval(), classes=unordered(names))


@pytest.mark.parametrize("mode", ["dense", "incremental", "auto"])
def test_approx_knobs_outside_approx_are_refused_whatever_auto_picks(mode):
    image = torch.rand(3, 32, 32)
    for k in (8, 32):  # auto picks incremental at one and dense at the other on net1
        with pytest.raises(UserError, match="mode='approx'"):
            occlusion_map("net1", image, k=k, stride=8 if k == 8 else 1, mode=mode, tau=0.5)


def test_approx_takes_numpy_knobs():
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    r = occlusion_map("net1", image, k=8, stride=4, mode="approx", tau=np.float32(0.0), coarse=np.int64(1),
                      approx_precision="fp32")
    ref, _ = naive_map(load_model("net1"), image, 8, 4)
    np.testing.assert_allclose(r.map, ref, atol=1e-5)


@pytest.mark.parametrize("device", ["tpu", "cpu0", "opengl"])
def test_load_model_refuses_a_bad_device_in_one_line(device):
    with pytest.raises(UserError, match="device"):
        load_model("net1", device=device)


def test_names_must_match_the_batch():
    from cifarbench.analysis.occlusion import make_engine, occlusion_maps

    engine = make_engine("net1", 8, 8, mode="dense", device="cpu")
    with pytest.raises(UserError, match="one name per image"):
        occlusion_maps(engine, torch.rand(3, 3, 32, 32), 8, stride=8, names=["a", "b"])


def test_hand_made_filter_selections_are_checked_against_the_layer_table():
    from cifarbench.analysis.ablation import zeroed_model

    model = load_model("net1")
    with pytest.raises(UserError, match="filter -1 does not exist"):
        zeroed_model(model, (("conv1", -1),))
    with pytest.raises(UserError, match="does not exist"):
        zeroed_model(model, (("conv1", 10_000),))
    with pytest.raises(UserError, match="unknown layer 'nope'"):
        zeroed_model(model, (("nope", 0),))
    variant = zeroed_model(model, (("conv1", 2),))  # the definition: weight[2] is zero, the rest as they were
    w0, w1 = model.state_dict(), variant.state_dict()
    changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert len(changed) == 1 and changed[0].endswith("weight") and bool((w1[changed[0]][2] == 0).all())


def test_0_255_scale_normalization_constants_are_warned_about(capsys):
    resolve_source(Small().eval(), mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "0..255-scale" in err
    resolve_source(Small().eval(), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert "warning" not in capsys.readouterr().err


def test_a_pil_image_is_taken_without_warnings(recwarn):
    from PIL import Image

    rgb = np.random.default_rng(6).integers(0, 256, (32, 32, 3), np.uint8)
    r = occlusion_map(Small().eval(), Image.fromarray(rgb), k=8, stride=8, mode="dense")
    ref, _ = naive_map(Small().eval(), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, 8, 8)
    np.testing.assert_allclose(r.map, ref, atol=1e-5)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
