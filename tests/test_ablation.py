"""Filter-zeroed variants and sweeps, each checked against an independent computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarbench.analysis.ablation import (ablate, predictions, sweep, sweep_by_variants, variant_runtime,
                                         zeroed_model)
from cifarbench.analysis.metrics import accuracy, confusion_matrix, per_class_accuracy
from cifarbench.data import load_split
from cifarbench.filters import all_filters, resolve_selection
from cifarbench.nets import normalize
from cifarbench.runtime import TorchRuntime
from cifarbench.zoo import create_model
from conftest import random_model


def fitted_model(name: str, seed: int = 0, **overrides):
    """A random body whose last layer is fitted (ridge regression) to half-noisy labels of synthetic images: its
    predictions vary with the input and ablations change them, which a purely random net's do not."""
    model = random_model(name, seed, **overrides)
    train = load_split("synthetic:200", "train")
    g = torch.Generator().manual_seed(seed)
    y = train.labels.clone()
    noisy = torch.rand(len(y), generator=g) < 0.5
    y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    with torch.no_grad():
        feats = model.head[:-1](model.layers(normalize(train.float_images())))
        f1 = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        onehot = torch.nn.functional.one_hot(y, 10).double()
        w = torch.linalg.solve(f1.T @ f1 + 1e-3 * torch.eye(f1.shape[1], dtype=torch.double), f1.T @ onehot)
        model.head[-1].weight.copy_(w[:-1].T.float())
        model.head[-1].bias.copy_(w[-1].float())
    return model


@pytest.fixture(scope="module")
def data():
    return load_split("synthetic:400", "test")  # 80 images


@pytest.fixture(scope="module")
def net1():
    return fitted_model("net1")


@pytest.fixture(scope="module")
def small_net4():
    return fitted_model("net4", l1_oc=4)


def naive_predictions(model, data):
    with torch.no_grad():
        return model(data.float_images()).argmax(1).numpy()


def fresh_zeroed(model, selection, zero_bias=False):
    """Independent variant: a new net loaded from a state dict edited by parameter name."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer, j in selection:
        state[f"layers.{layer}.conv.weight"][j] = 0
        if zero_bias:
            state[f"layers.{layer}.conv.bias"][j] = 0
    fresh = create_model(model.name, **model.hparams)
    fresh.load_state_dict(state)
    return fresh.eval()


def test_metrics_match_naive_count():
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    conf = confusion_matrix(torch.from_numpy(preds), labels, 4)
    for t in range(4):
        for p in range(4):
            assert conf[t, p] == sum(1 for a, b in zip(labels, preds) if a == t and b == p)
    classes = ["a", "b", "c", "d"]
    pc = per_class_accuracy(conf, classes)
    for t, c in enumerate(classes):
        assert pc[c] == pytest.approx(np.mean(preds[labels == t] == t))
    assert accuracy(conf) == pytest.approx(np.mean(preds == labels))
    assert per_class_accuracy(confusion_matrix([0], [0], 2), ["x", "y"])["y"] is None


@pytest.mark.parametrize("zero_bias", [False, True])
def test_only_the_chosen_slice_changes(small_net4, zero_bias):
    sel = resolve_selection(small_net4, ["conv2:1", "conv5:0,3"])
    variant = zeroed_model(small_net4, sel, zero_bias)
    before, after = small_net4.state_dict(), variant.state_dict()
    for key in before:
        changed = before[key] != after[key]
        expected = torch.zeros_like(changed)
        for layer, j in sel:
            if key == f"layers.{layer}.conv.weight" or (zero_bias and key == f"layers.{layer}.conv.bias"):
                expected[j] = before[key][j] != 0
        assert torch.equal(changed, expected), key
        if key.endswith("conv.weight") and any(key == f"layers.{layer}.conv.weight" for layer, _ in sel):
            assert all(after[key][j].abs().sum() == 0 for layer, j in sel if key == f"layers.{layer}.conv.weight")


@pytest.mark.parametrize("zero_bias", [False, True])
def test_torch_variant_equals_fresh_zeroed_model(small_net4, data, zero_bias):
    sel = resolve_selection(small_net4, ["conv1:0,1", "conv3:2", "conv6:5"])
    x = data.float_images()
    got = variant_runtime(TorchRuntime(small_net4), small_net4, sel, zero_bias).logits(x)
    with torch.no_grad():
        want = fresh_zeroed(small_net4, sel, zero_bias)(x)
        assert not torch.allclose(want, small_net4(x), atol=1e-4)  # the ablation matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def onnx_net4(small_net4):
    from cifarbench.export.onnx import to_onnx_proto
    from cifarbench.runtime.ort import OrtRuntime

    proto = to_onnx_proto(small_net4)
    runtime = OrtRuntime(proto)
    runtime.proto = proto  # what runtime_proto() reads first; saves a second export
    return runtime


@pytest.mark.parametrize("zero_bias", [False, True])
def test_onnx_variant_equals_torch_variant(small_net4, onnx_net4, data, zero_bias):
    """The exporter folds BN into the conv; the edited initializers must still give the torch variant."""
    from onnx import numpy_helper

    from cifarbench.export.variants import onnx_variant

    sel = resolve_selection(small_net4, ["conv1:0,1", "conv2:0,1", "conv4:3"])
    x = data.float_images()
    got = variant_runtime(onnx_net4, small_net4, sel, zero_bias).logits(x)
    with torch.no_grad():
        want = fresh_zeroed(small_net4, sel, zero_bias)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # only the chosen slices of the chosen initializers changed
    base = {t.name: numpy_helper.to_array(t) for t in onnx_net4.proto.graph.initializer}
    edited = {t.name: numpy_helper.to_array(t) for t in onnx_variant(onnx_net4.proto, small_net4, sel,
                                                                      zero_bias).graph.initializer}
    assert base.keys() == edited.keys()
    for name in base:
        rows = sorted({int(i) for i in np.argwhere(base[name] != edited[name])[:, 0]}) if base[name].ndim else []
        layer = name.split(".")[1] if name.startswith("layers.") else None
        chosen = sorted(j for lyr, j in sel if lyr == layer)
        if name.endswith("weight") and chosen:
            assert rows == chosen and np.all(edited[name][chosen] == 0)
        elif name.endswith("bias") and chosen and zero_bias:
            assert set(rows) <= set(chosen)
        else:
            assert rows == [], name


def test_ablate_tables_match_naive_count(net1, data):
    sel = resolve_selection(net1, None)
    result = ablate(TorchRuntime(net1), net1, data, sel, flipped=50)
    labels = data.labels.numpy()
    before = naive_predictions(net1, data)
    after = naive_predictions(fresh_zeroed(net1, sel), data)
    assert result["before"]["accuracy"] == pytest.approx(np.mean(before == labels))
    assert result["after"]["accuracy"] == pytest.approx(np.mean(after == labels))
    for t, c in enumerate(data.classes):
        b, a = np.mean(before[labels == t] == t), np.mean(after[labels == t] == t)
        assert result["before"]["per_class"][c] == pytest.approx(b)
        assert result["after"]["per_class"][c] == pytest.approx(a)
        assert result["difference"]["per_class"][c] == pytest.approx(b - a)
        for p in range(10):
            assert result["confusion"]["after"][t][p] == int(np.sum((labels == t) & (after == p)))
    flips = [i for i in range(50) if before[i] == labels[i] and after[i] != labels[i]]
    assert [f["index"] for f in result["flipped"]] == flips and flips
    assert all(data.classes[before[f["index"]]] == f["before"] for f in result["flipped"])
    assert set(result) == {"filters", "before", "after", "difference", "confusion", "flipped"}


def _per_filter(result):
    return {(r["layer"], r["filter"]): (r["accuracy"], r["per_class"]) for r in result["filters"]}


@pytest.mark.parametrize("zero_bias", [False, True])
def test_sweep_equals_single_ablations(net1, data, zero_bias):
    rt = TorchRuntime(net1)
    sel = all_filters(net1)[::4]
    swept = sweep(rt, net1, data, sel, zero_bias, batch_size=32)
    labels = data.labels.numpy()
    single = {}
    for f in sel:
        conf = confusion_matrix(predictions(variant_runtime(rt, net1, (f,), zero_bias), data), labels, 10)
        single[f] = (accuracy(conf), per_class_accuracy(conf, data.classes))
    assert _per_filter(swept) == single
    drops = [r["drop"] for r in swept["filters"]]
    assert drops == sorted(drops, reverse=True) and max(drops) > 0
    assert [r["rank"] for r in swept["filters"]] == list(range(1, len(sel) + 1))
    for r in swept["filters"]:
        change = {c: r["per_class"][c] - swept["baseline"]["per_class"][c] for c in data.classes}
        assert r["largest_loss"]["change"] == pytest.approx(min(change.values()))
        assert r["largest_gain"]["change"] == pytest.approx(max(change.values()))
        # a class is named only where one gained (lost)
        gained, lost = max(change, key=change.get), min(change, key=change.get)
        assert r["largest_gain"]["class"] == (gained if change[gained] > 0 else None)
        assert r["largest_loss"]["class"] == (lost if change[lost] < 0 else None)


def test_sweep_through_conv_and_pool_suffixes(small_net4, data):
    """net4: zeroing conv3 (pool, then conv4 next), conv5 (conv6 next) and conv6 (pool, then the head)."""
    rt = TorchRuntime(small_net4)
    sel = resolve_selection(small_net4, ["conv3:0-7", "conv5:0-5", "conv6:0-9"])
    fast = sweep(rt, small_net4, data, sel, batch_size=40)
    slow = sweep_by_variants(rt, small_net4, data, sel)
    assert _per_filter(fast) == _per_filter(slow)
    assert fast["baseline"] == slow["baseline"]
    assert any(r["drop"] != 0 for r in fast["filters"])


def test_sweep_through_onnx_runs_variants(small_net4, onnx_net4, data):
    sel = resolve_selection(small_net4, ["conv2:0-2", "conv6:0-2"])
    via_onnx = sweep(onnx_net4, small_net4, data, sel)
    assert _per_filter(via_onnx) == _per_filter(sweep(TorchRuntime(small_net4), small_net4, data, sel))


def test_sweep_keeps_a_selection_not_grouped_by_layer(small_net4, data):
    """A selection in the user's order (conv2:0, conv1:0, conv2:1): the fast path computes layer by layer, yet each
    filter's row and confusion matrix must be that filter's, as a hand-zeroed fresh net gives."""
    from cifarbench.analysis.ablation import sweep_confusions

    sel = (("conv2", 0), ("conv1", 0), ("conv2", 1))
    labels = data.labels.numpy()
    want = {f: confusion_matrix(naive_predictions(fresh_zeroed(small_net4, (f,)), data), labels, 10) for f in sel}
    assert len({w.tobytes() for w in want.values()}) == 3  # the three ablations differ: a mix-up would show
    base, confs = sweep_confusions(TorchRuntime(small_net4), small_net4, data, sel, batch_size=40)
    assert np.array_equal(base, confusion_matrix(naive_predictions(small_net4, data), labels, 10))
    for f, conf in zip(sel, confs):
        assert np.array_equal(conf, want[f]), f
    rows = {(r["layer"], r["filter"]): r for r in sweep(TorchRuntime(small_net4), small_net4, data, sel)["filters"]}
    for f in sel:
        assert rows[f]["accuracy"] == pytest.approx(np.trace(want[f]) / len(labels))
