"""Filter specs: syntax, the report's default selection, and validation against the net."""
from __future__ import annotations

import pytest

from cifarbench.errors import UserError
from cifarbench.filters import (all_filters, by_layer, default_selection, format_selection, parse_filters,
                                resolve_layers, resolve_selection, split_specs)
from cifarbench.zoo import create_model


@pytest.fixture(scope="module")
def net4():
    return create_model("net4", l1_oc=4)


def test_parse_lists_ranges_and_separators():
    assert parse_filters(["conv1:0,1", "conv3:4-6,9"]) == {"conv1": [0, 1], "conv3": [4, 5, 6, 9]}
    assert split_specs(["conv1:0,1 conv2:3;conv4:0"]) == ["conv1:0,1", "conv2:3", "conv4:0"]


@pytest.mark.parametrize("spec", ["conv1", "conv1:", "conv1:a", "conv1:0,,1", "conv1:3-1", "conv1:-1"])
def test_malformed_specs(spec):
    with pytest.raises(UserError):
        parse_filters([spec])


def test_default_selection_is_the_reports(net4):
    assert default_selection(net4) == tuple((f"conv{i}", j) for i in range(1, 6) for j in (0, 1))
    assert default_selection(create_model("net1")) == (("conv1", 0), ("conv1", 1), ("conv2", 0), ("conv2", 1))
    assert resolve_selection(net4, None) == default_selection(net4)


def test_selection_sorted_deduplicated_and_formatted(net4):
    sel = resolve_selection(net4, ["conv3:2,0", "conv1:1", "conv3:0"])
    assert sel == (("conv1", 1), ("conv3", 0), ("conv3", 2))
    assert format_selection(sel) == "conv1:1 conv3:0,2"
    assert by_layer(sel) == {"conv1": [1], "conv3": [0, 2]}


def test_all_filters_counts(net4):
    sel = resolve_selection(net4, None, every=True)
    assert len(sel) == 4 + 4 + 8 + 16 + 16 + 32 and sel == all_filters(net4)
    assert len(all_filters(create_model("net4"))) == 1280


# any layer name parses (models name their own layers); a name the net lacks is refused against the net
@pytest.mark.parametrize("specs, match", [(["conv7:0"], "unknown layer"), (["fc1:0"], "unknown layer"),
                                          (["conv3:8"], "out of range"),
                                          (["conv1:0-4"], "out of range")])
def test_validation_against_the_net(net4, specs, match):
    with pytest.raises(UserError, match=match):
        resolve_selection(net4, specs)


def test_specs_and_all_conflict(net4):
    with pytest.raises(UserError, match="not both"):
        resolve_selection(net4, ["conv1:0"], every=True)


def test_sweep_layers(net4):
    assert resolve_layers(net4, "all") == [f"conv{i}" for i in range(1, 7)]
    assert resolve_layers(net4, "conv5,conv2") == ["conv2", "conv5"]
    with pytest.raises(UserError, match="unknown layer"):
        resolve_layers(net4, "pool1")
