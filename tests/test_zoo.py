"""The four nets reproduce every parameter count of the report (DESIGN.md section 2)."""
import statistics

import pytest
import torch

import cifarbench
from cifarbench import create_model, list_models, load_model
from cifarbench.checkpoint import save_checkpoint
from cifarbench.errors import UserError
from cifarbench.nets import count_parameters

REPORT_COUNTS = [
    ("net1", {}, 173_026),
    ("net2", {"l1_oc": 64, "kernel_size": 5}, 4_870_654),
    ("net3", {"l1_oc": 96}, 6_819_454),
    ("net3", {"l1_oc": 32}, 1_506_430),
    ("net3", {"l1_oc": 64}, 3_775_870),
    ("net4", {}, 4_403_518),
]


def test_registry_lists_the_four_nets():
    assert list_models() == ["net1", "net2", "net3", "net4"]
    assert cifarbench.create_model is create_model


@pytest.mark.parametrize("name,overrides,count", REPORT_COUNTS)
def test_parameter_counts_match_the_report(name, overrides, count):
    assert count_parameters(create_model(name, **overrides)) == count


@pytest.mark.parametrize("l1,mean", [(18, 654_346), (32, 1_675_198), (64, 5_719_038)])
def test_net2_grid_mean_over_kernel_sizes(l1, mean):
    counts = [count_parameters(create_model("net2", l1_oc=l1, kernel_size=k)) for k in (3, 5, 7)]
    assert statistics.mean(counts) == mean


@pytest.mark.parametrize("k,mean", [(3, 2_011_954), (5, 2_248_274), (7, 3_788_354)])
def test_net2_grid_mean_over_widths(k, mean):
    counts = [count_parameters(create_model("net2", l1_oc=l1, kernel_size=k)) for l1 in (18, 32, 64)]
    assert statistics.mean(counts) == mean


def test_net4_has_1280_filters_and_the_receptive_fields_of_design():
    model = create_model("net4")
    assert sum(b.conv.out_channels for b in model.conv_blocks().values()) == 1280
    assert model.receptive_fields() == {"conv1": 3, "conv2": 5, "conv3": 7, "conv4": 12, "conv5": 16, "conv6": 20}


@pytest.mark.parametrize("name", list_models())
def test_every_net_maps_images_to_ten_logits(name):
    model = create_model(name).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert model.__class__.__doc__ and model.spec["description"]


def test_every_report_grid_point_builds():
    for name in list_models():
        grid = cifarbench.zoo.get_spec(name)["seed_grid"]
        keys = [k for k in grid if k in cifarbench.zoo.HPARAMS]
        import itertools

        for values in itertools.product(*(grid[k] for k in keys)):
            create_model(name, **dict(zip(keys, values)))(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("bad,match", [
    (dict(name="net9"), "unknown net"),
    (dict(name="net1", width=3), "unknown hyper-parameter"),
    (dict(name="net1", dropout=0.5), "no dropout"),
    (dict(name="net4", dropout=1.5), "dropout must be"),
    (dict(name="net1", l1_oc="many"), "not a valid int"),
    (dict(name="net1", kernel_size=40), "shrinks the image"),
])
def test_bad_overrides_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match):
        create_model(**bad)


def test_load_model_roundtrip_and_errors(tmp_path):
    model = create_model("net1", l1_oc=6).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"net": "net1", "hparams": model.hparams})
    loaded = load_model(path)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), model(x)) and not loaded.training
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_model(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="no such net or checkpoint"):
        load_model(tmp_path / "missing.safetensors")
    save_checkpoint(path, create_model("net1"), {"net": "net1", "hparams": model.hparams})
    with pytest.raises(UserError, match="does not match"):
        load_model(path)
