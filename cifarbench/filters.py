"""Filter selections: parsing ``conv1:0,1 conv2:0-3`` specs and checking them against a net.

A selection is a tuple of ``(layer, filter)`` pairs in net order (layer order, then filter index), without
duplicates, so the same filters always give the same cache keys, tables and file names. The report's default
selection is filters 0 and 1 of conv1..conv5 (of every conv layer for nets with fewer than five).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable

from .errors import UserError

Selection = tuple[tuple[str, int], ...]

DEFAULT_LAYERS = 5
DEFAULT_FILTERS = (0, 1)
_SPEC = re.compile(r"^(conv\d+):(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


def split_specs(specs: Iterable[str] | None) -> list[str]:
    """Specs given as separate arguments, or several in one argument separated by spaces or semicolons."""
    return [tok for spec in specs or () for tok in re.split(r"[\s;]+", spec.strip()) if tok]


#: largest filter index a spec may name before it is checked against a net: far above any conv layer's width
#: (net4's widest has 512), small enough that expanding a checked range can never take much memory
MAX_INDEX = 1 << 16


def parse_ranges(specs: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
    """Syntax only, nothing expanded: ``["conv1:0,1", "conv3:4-6"]`` -> ``{"conv1": [(0, 0), (1, 1)],
    "conv3": [(4, 6)]}``. A range is checked against a layer's width before it becomes a list of indices, so
    ``conv1:0-300000000`` costs nothing."""
    out: dict[str, list[tuple[int, int]]] = {}
    for tok in split_specs(specs):
        m = _SPEC.match(tok)
        shown = repr(tok if len(tok) <= 60 else tok[:57] + "...")  # one readable line, whatever was typed
        if not m:
            raise UserError(f"malformed filter spec {shown}; expected LAYER:I[,J,...] with ranges I-J, "
                            f"e.g. conv1:0,1 conv3:4-7")
        ranges = out.setdefault(m.group(1), [])
        for part in m.group(2).split(","):
            lo, _, hi = part.partition("-")
            # a digit string too long for int() (Python refuses > 4300 digits) is simply out of range
            if len(lo) > 9 or len(hi) > 9:
                raise UserError(f"filter index out of range in {shown}")
            lo_i, hi_i = int(lo), int(hi or lo)
            if hi_i < lo_i:
                raise UserError(f"empty filter range {part!r} in {shown} (the range is reversed)")
            ranges.append((lo_i, hi_i))
    return out


def parse_filters(specs: Iterable[str]) -> dict[str, list[int]]:
    """Syntax only: ``["conv1:0,1", "conv3:4-6"]`` -> ``{"conv1": [0, 1], "conv3": [4, 5, 6]}``. Indices above
    :data:`MAX_INDEX` are refused before expanding (no net has that many filters)."""
    out: dict[str, list[int]] = {}
    for layer, ranges in parse_ranges(specs).items():
        for lo, hi in ranges:
            if hi >= MAX_INDEX:
                raise UserError(f"filter index {hi} in {layer} is out of range (no conv layer has "
                                f"{MAX_INDEX} filters)")
        out[layer] = [j for lo, hi in ranges for j in range(lo, hi + 1)]
    return out


def layer_channels(model) -> OrderedDict[str, int]:
    """Conv layer name -> number of filters, in net order."""
    return OrderedDict((name, block.conv.out_channels) for name, block in model.conv_blocks().items())


def default_selection(model) -> Selection:
    layers = list(layer_channels(model).items())[:DEFAULT_LAYERS]
    return tuple((name, j) for name, n in layers for j in DEFAULT_FILTERS if j < n)


def all_filters(model, layers: Iterable[str] | None = None) -> Selection:
    channels = layer_channels(model)
    names = list(channels) if layers is None else list(layers)
    return tuple((name, j) for name in names for j in range(channels[name]))


def resolve_selection(model, specs: Iterable[str] | None = None, every: bool = False) -> Selection:
    """The filters to analyse: ``every`` filter of the net, the given specs, or the report's default."""
    given = list(specs or ())
    specs = split_specs(given)
    if given and not specs:  # `--filters ""` names no filter: an empty selection, not the default one
        raise UserError("the filter spec is empty; give LAYER:I[,J,...] (e.g. conv1:0,1) or leave it out")
    if every and specs:
        raise UserError("give either filter specs or --all, not both")
    if every:
        return all_filters(model)
    if not specs:
        return default_selection(model)
    channels = layer_channels(model)
    chosen = set()
    for layer, ranges in parse_ranges(specs).items():
        if layer not in channels:
            raise UserError(f"unknown layer {layer!r} in {model.name}; its conv layers are {', '.join(channels)}")
        for lo, hi in ranges:  # bounds first: a range is expanded only once it fits the layer
            if hi >= channels[layer]:
                what = f"{layer}:{hi}" if lo == hi else f"{layer}:{lo}-{hi}"
                raise UserError(f"filter {what} out of range: {layer} of {model.name} has "
                                f"{channels[layer]} filters (0..{channels[layer] - 1})")
            chosen.update((layer, j) for j in range(lo, hi + 1))
    order = {name: i for i, name in enumerate(channels)}
    return tuple(sorted(chosen, key=lambda lf: (order[lf[0]], lf[1])))


def resolve_layers(model, spec: str) -> list[str]:
    """``--sweep`` target: one conv layer name, several separated by commas, or ``all``."""
    channels = layer_channels(model)
    if spec.strip() == "all":
        return list(channels)
    names = [s for s in re.split(r"[\s,;]+", spec.strip()) if s]
    if not names:
        raise UserError("--sweep needs a conv layer name (e.g. conv3) or 'all'")
    for name in names:
        if name not in channels:
            raise UserError(f"unknown layer {name!r} in {model.name}; its conv layers are {', '.join(channels)}")
    return sorted(set(names), key=list(channels).index)


def by_layer(selection: Selection) -> OrderedDict[str, list[int]]:
    out: OrderedDict[str, list[int]] = OrderedDict()
    for layer, j in selection:
        out.setdefault(layer, []).append(j)
    return out


def format_selection(selection: Selection) -> str:
    """The canonical spec string of a selection: ``conv1:0,1 conv2:0,1``."""
    return " ".join(f"{layer}:{','.join(map(str, idx))}" for layer, idx in by_layer(selection).items())
