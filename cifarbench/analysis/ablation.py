"""Filter-zeroed variants (DESIGN section 3): one selection at a time, or every filter of a layer in a sweep.

Zeroing filter j of conv layer L (``weight[j] = 0``, bias kept unless ``zero_bias``) turns channel j of L's output
into a constant, ``c_j = relu(bn(bias_j))``. A sweep uses that: every layer before and including L is unchanged,
so L's output is computed once per image; the first linear operation after L (the next conv, or the head's first
fully connected layer, with only per-channel max-pools in between) sees its input change in channel j alone, so
its output changes by ``W_next[:, j] * (c_j - a_j)``, a single-input-channel convolution (or a matrix product)
that costs a fraction ``1 / C_in`` of the full layer. Only the layers after that are recomputed, for several
variants stacked in one batch. Runtimes without access to the net's layers (ONNX, TensorRT) run the variants one
by one through the runtime instead, which is also the baseline the sweep benchmark compares against.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..errors import UserError
from ..filters import Selection, by_layer
from ..nets import CifarNet, ConvBlock
from .metrics import confusion_matrix, difference, summary

DEFAULT_BATCH = 250
#: largest number of float32 elements of one stacked-variant tensor in a sweep (bounds its memory)
SWEEP_ELEMENTS = 1 << 25

Progress = Callable[[int], None] | None


def selection_json(selection: Selection) -> list[dict]:
    return [{"layer": layer, "filter": j} for layer, j in selection]


# ---------------------------------------------------------------------------------------------------- variants
def zeroed_model(model: CifarNet, selection: Selection, zero_bias: bool = False) -> CifarNet:
    """A copy of ``model`` with the selected filters' weights (and biases if ``zero_bias``) set to zero."""
    variant = copy.deepcopy(model).eval()
    blocks = variant.conv_blocks()
    with torch.no_grad():
        for layer, idx in by_layer(selection).items():
            conv = blocks[layer].conv
            conv.weight[idx] = 0
            if zero_bias and conv.bias is not None:
                conv.bias[idx] = 0
    return variant


def variant_runtime(runtime, model: CifarNet, selection: Selection, zero_bias: bool = False):
    """The same backend running the filter-zeroed variant: a zeroed torch copy, or a zeroed ONNX graph."""
    from ..runtime import TorchRuntime

    if type(runtime) is TorchRuntime:
        return TorchRuntime(zeroed_model(runtime.model, selection, zero_bias), runtime.device,
                            channels_last=runtime.channels_last, precision=runtime.precision)
    if runtime.name == "onnxruntime":
        from ..export.variants import onnx_variant, runtime_proto
        from ..runtime.ort import OrtRuntime

        return OrtRuntime(onnx_variant(runtime_proto(runtime, model), model, selection, zero_bias), runtime.device)
    raise UserError(f"filter-zeroed variants are not available for backend {runtime.name!r}; "
                    f"use torch or onnxruntime")


def predictions(runtime, data: Dataset, batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> np.ndarray:
    """Predicted class of every image of ``data`` through ``runtime``."""
    out = []
    for i in range(0, len(data), batch_size):
        batch = data.images[i:i + batch_size].float().div_(255)
        out.append(runtime.logits(batch).argmax(1).cpu())
        if progress:
            progress(len(batch))
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def ablate(runtime, model: CifarNet, data: Dataset, selection: Selection, zero_bias: bool = False,
           flipped: int = 256, batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> dict:
    """Per-class accuracy and confusion matrices before and after zeroing ``selection``, and the images among the
    first ``flipped`` that were right before and wrong after. ``difference`` is before - after (the report's)."""
    if not selection:
        raise UserError("no filters selected")
    n = len(data.classes)
    before = predictions(runtime, data, batch_size, progress)
    after = predictions(variant_runtime(runtime, model, selection, zero_bias), data, batch_size, progress)
    labels = data.labels.numpy()
    conf_b, conf_a = confusion_matrix(before, labels, n), confusion_matrix(after, labels, n)
    sb, sa = summary(conf_b, data.classes), summary(conf_a, data.classes)
    head = slice(0, max(flipped, 0))
    flips = np.flatnonzero((before[head] == labels[head]) & (after[head] != labels[head]))
    return {
        "filters": selection_json(selection),
        "before": sb, "after": sa, "difference": difference(sb, sa),
        "confusion": {"before": conf_b.tolist(), "after": conf_a.tolist()},
        "flipped": [{"index": int(i), "label": data.classes[labels[i]], "before": data.classes[before[i]],
                     "after": data.classes[after[i]]} for i in flips],
    }


# ---------------------------------------------------------------------------------------------------- sweeps
@dataclass
class _LayerSplit:
    """The net around conv layer ``layer``: per-channel ops after it, the next linear op, and the rest."""

    layer: str
    index: int                 # position of the layer in model.layers
    between: list[nn.Module]   # per-channel modules (max-pools) between the layer's output and ``next_op``
    next_op: nn.Module         # nn.Conv2d or nn.Linear
    flatten: bool              # the head's Flatten sits before next_op
    rest: list[nn.Module]      # everything after next_op up to the logits
    constants: torch.Tensor    # [C] output of each filter once zeroed: relu(bn(bias)) per channel


def _split(model: CifarNet, layer: str, zero_bias: bool) -> _LayerSplit:
    names = [n for n, _ in model.layers.named_children()]
    mods = list(model.layers.children())
    index = names.index(layer)
    between = []
    for k in range(index + 1, len(mods)):
        mod = mods[k]
        if isinstance(mod, nn.MaxPool2d):
            between.append(mod)
        elif isinstance(mod, ConvBlock):
            rest = [mod.bn, mod.act, *mods[k + 1:], *model.head]
            next_op, flatten = mod.conv, False
            break
        else:
            raise TypeError(f"sweep cannot see through {type(mod).__name__} after {layer}")
    else:
        head = list(model.head)
        if not (isinstance(head[0], nn.Flatten) and isinstance(head[1], nn.Linear)):
            raise TypeError("sweep expects the head to start with Flatten, Linear")
        next_op, flatten, rest = head[1], True, head[2:]
    block = model.conv_blocks()[layer]
    bias = block.conv.bias if block.conv.bias is not None and not zero_bias else torch.zeros(block.conv.out_channels, device=block.conv.weight.device)
    with torch.no_grad():
        constants = block.act(block.bn(bias.detach().reshape(1, -1, 1, 1).clone())).reshape(-1)
    return _LayerSplit(layer, index, between, next_op, flatten, rest, constants)


def _run(mods, x):
    for m in mods:
        x = m(x)
    return x


def _variant_logits(split: _LayerSplit, a: torch.Tensor, z: torch.Tensor, js: torch.Tensor) -> torch.Tensor:
    """Logits [B, V, classes] of the variants zeroing filters ``js``, from the next op's input ``a`` and output ``z``."""
    b, v = a.shape[0], len(js)
    d = split.constants[js].reshape(1, v, 1, 1) - a[:, js]            # [B, V, H, W]: change of each channel
    w = split.next_op.weight
    if split.flatten:
        s = a.shape[2] * a.shape[3]
        wv = w.reshape(w.shape[0], a.shape[1], s)[:, js]                # [O, V, S]
        delta = torch.einsum("bvs,ovs->bvo", d.reshape(b, v, s), wv)
        zv = (z[:, None, :] + delta).reshape(b * v, -1)
    else:
        conv = split.next_op
        wv = w[:, js].transpose(0, 1).reshape(v * w.shape[0], 1, *w.shape[2:])
        delta = F.conv2d(d.contiguous(), wv, None, conv.stride, conv.padding, conv.dilation, groups=v)
        zv = (z[:, None] + delta.reshape(b, v, *z.shape[1:])).reshape(b * v, *z.shape[1:])
    return _run(split.rest, zv).reshape(b, v, -1)


def _variant_group(split: _LayerSplit, a: torch.Tensor, z: torch.Tensor) -> int:
    """How many variants to stack per pass so the largest stacked tensor (the channel change [B, V, H, W] or the
    next op's output [B, V, ...]) stays under SWEEP_ELEMENTS."""
    per_variant = len(a) * max(z[0].numel(), a[0, 0].numel())
    return max(1, SWEEP_ELEMENTS // per_variant)


def sweep(runtime, model: CifarNet, data: Dataset, selection: Selection, zero_bias: bool = False,
          batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> dict:
    """Ablate each filter of ``selection`` on its own; ranked results (see :func:`sweep_result`).

    Torch runtimes use the cached-prefix, stacked-suffix computation described in the module docstring, one pass
    over the data for every layer; other runtimes run each variant through the runtime."""
    from ..runtime import TorchRuntime

    if type(runtime) is not TorchRuntime:
        return sweep_by_variants(runtime, model, data, selection, zero_bias, batch_size, progress)
    net, dev = runtime.model, runtime.device
    dtype = next(net.parameters()).dtype
    layers = by_layer(selection)
    splits = {layer: _split(net, layer, zero_bias) for layer in layers}
    js = {layer: torch.tensor(idx, device=dev) for layer, idx in layers.items()}
    n, nc = len(data), len(data.classes)
    base_preds, var_preds = [], {layer: [] for layer in layers}
    last = max(s.index for s in splits.values())
    mods = list(net.layers.children())
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = data.images[i:i + batch_size].to(dev).float().div_(255).to(dtype)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            h, base_done = (x - 0.5) / 0.5, False
            for k, mod in enumerate(mods[:last + 1]):
                h = mod(h)
                split = next((s for s in splits.values() if s.index == k), None)
                if split is None:
                    continue
                a = _run(split.between, h)
                z = split.next_op(a.flatten(1) if split.flatten else a)
                if not base_done:
                    base_preds.append(_run(split.rest, z.clone()).argmax(1).cpu())
                    base_done = True
                group = _variant_group(split, a, z)
                ids = js[split.layer]
                preds = [_variant_logits(split, a, z, ids[g:g + group]).argmax(2).cpu()
                         for g in range(0, len(ids), group)]
                var_preds[split.layer].append(torch.cat(preds, 1))
            if progress:
                progress(len(x))
    labels = data.labels.numpy()
    base = confusion_matrix(torch.cat(base_preds), labels, nc)
    confs = []
    for layer, idx in layers.items():
        p = torch.cat(var_preds[layer]).numpy()                          # [N, V]
        confs.extend(confusion_matrix(p[:, v], labels, nc) for v in range(len(idx)))
    return sweep_result(selection, base, confs, data.classes)


def sweep_by_variants(runtime, model: CifarNet, data: Dataset, selection: Selection, zero_bias: bool = False,
                      batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> dict:
    """The same sweep, one filter-zeroed variant at a time through the full network of ``runtime``."""
    nc, labels = len(data.classes), data.labels.numpy()
    base = confusion_matrix(predictions(runtime, data, batch_size, progress), labels, nc)
    confs = [confusion_matrix(predictions(variant_runtime(runtime, model, (f,), zero_bias), data, batch_size,
                                          progress), labels, nc) for f in selection]
    return sweep_result(selection, base, confs, data.classes)


def sweep_result(selection: Selection, base: np.ndarray, confs: list[np.ndarray], classes) -> dict:
    """Filters ranked by overall accuracy drop (largest first; ties in net order), each with its largest per-class
    gain and loss. Drops and changes are fractions: drop = before - after, change = after - before."""
    sb = summary(base, classes)
    rows = []
    for (layer, j), conf in zip(selection, confs):
        s = summary(conf, classes)
        change = {c: (v - sb["per_class"][c]) for c, v in s["per_class"].items()
                  if v is not None and sb["per_class"][c] is not None}
        gain = max(change.items(), key=lambda kv: kv[1]) if change else (None, None)
        loss = min(change.items(), key=lambda kv: kv[1]) if change else (None, None)
        rows.append({"layer": layer, "filter": j, "accuracy": s["accuracy"], "drop": sb["accuracy"] - s["accuracy"],
                     "per_class": s["per_class"],
                     "largest_gain": {"class": gain[0], "change": gain[1]},
                     "largest_loss": {"class": loss[0], "change": loss[1]}})
    order = sorted(range(len(rows)), key=lambda r: -rows[r]["drop"])   # stable: ties keep net order
    ranked = [dict(rows[r], rank=k + 1) for k, r in enumerate(order)]
    return {"layers": list(by_layer(selection)), "baseline": sb, "filters": ranked}
