"""Filter-zeroed variants (DESIGN section 3): one selection at a time, or every filter of a layer in a sweep.

Zeroing filter j of conv layer L (``weight[j] = 0``, bias kept unless ``zero_bias``) turns channel j of L's output
into a constant, ``c_j = relu(bn(bias_j))``. A sweep uses that: every layer before and including L is unchanged,
so L's output is computed once per image; the first linear operation after L (the next conv, or the head's first
fully connected layer, with only per-channel max-pools in between) sees its input change in channel j alone, so
its output changes by ``W_next[:, j] * (c_j - a_j)``, a single-input-channel convolution (or a matrix product)
that costs a fraction ``1 / C_in`` of the full layer. Only the layers after that are recomputed, for several
variants stacked in one batch (zoo nets on a runtime with a torch module). Every other model and runtime runs the
variants one by one through the runtime instead, which is also the baseline the sweep benchmark compares against.

Any model: a runtime with a torch module gets a zeroed deep copy of it (``weight[j] = 0`` of the named conv); a
runtime with only an ONNX graph (its ``onnx_graph()`` capability) gets ``runtime.variant(graph)`` of a copy with
the Conv's weight slice zeroed in its initializer; a ``torch.export`` program's module gets the parameters its
conv calls read zeroed. Layers are named as :mod:`cifarbench.filters` names them (module paths, ONNX Conv node
names, the weight paths of a ``torch.export`` graph's convs, ``convN`` for the zoo nets). ``zero_bias`` on an ONNX
graph zeroes the Conv node's bias, which may hold a BatchNorm shift the exporter merged into it; results say so
(:func:`zero_bias_note`).
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
from ..filters import Selection, by_layer, check_selection, fetch_attr
from ..nets import CifarNet, ConvBlock
from .metrics import confusion_matrix, difference, summary

DEFAULT_BATCH = 250
#: largest number of float32 elements of one stacked-variant tensor in a sweep (bounds its memory)
SWEEP_ELEMENTS = 1 << 25

Progress = Callable[[int], None] | None


def selection_json(selection: Selection) -> list[dict]:
    return [{"layer": layer, "filter": j} for layer, j in selection]


# ---------------------------------------------------------------------------------------------------- variants
def torch_module_of(runtime):
    """The runtime's torch module (an eval module taking [0, 1] pixels), or None: its ``torch_module()``
    capability."""
    ask = getattr(runtime, "torch_module", None)
    return ask() if ask is not None else None


def onnx_path_of(runtime):
    """The ONNX file the runtime runs, or None: its ``onnx_path()`` capability."""
    ask = getattr(runtime, "onnx_path", None)
    return ask() if ask is not None else None


def onnx_graph_of(runtime):
    """The ``onnx.ModelProto`` the runtime runs, or None: its ``onnx_graph()`` capability."""
    ask = getattr(runtime, "onnx_graph", None)
    return ask() if ask is not None else None


def graph_table(graph, table):
    """``table`` with its layers located in ONNX ``graph``: ``table`` itself when every target is a Conv node of
    the graph (a table read from that graph); else, for a zoo net named by a torch table (``convN``, the nets are a
    plain chain of convs), the graph's own table under the same names. Anything else is refused: a torch module
    path does not name a node of an arbitrary graph."""
    from ..filters import onnx_layer_table

    nodes = {(n.name or n.output[0]) for n in graph.graph.node if n.op_type == "Conv"}
    if all(table[layer].target in nodes for layer in table):
        return table
    own = onnx_layer_table(graph, table.input_size, table.model, zoo=True)
    if list(own) == list(table) and all(own[n].filters == table[n].filters for n in own):
        return own
    raise UserError(f"the layers of {table.model} ({table.listing(4)}) are not the Conv nodes of the runtime's "
                    f"ONNX graph; name them as `cifarbench layers` lists them for that file")


def _find(root, path: str):
    """The submodule at ``path`` of the user's module, inside cifarbench's normalizing wrapper or not."""
    mods = dict(root.named_modules())
    for key in (path, f"model.{path}"):
        if key in mods:
            return mods[key]
    raise UserError(f"layer {path} is not in the model's torch module")


def zeroed_model(model, selection: Selection, zero_bias: bool = False, table=None):
    """A deep copy of torch module ``model`` with the selected filters' weights (``weight[j]``, and biases if
    ``zero_bias``) set to zero; the layers are found through ``table`` (default: ``model``'s own)."""
    from ..filters import layer_table

    from ..filters import graph_module_of

    table = layer_table(model if table is None else table)
    selection = check_selection(table, selection)
    variant = copy.deepcopy(model)
    variant.eval()
    with torch.no_grad():
        for layer, idx in by_layer(selection).items():
            info = table[layer]
            if info.node is not None:   # a conv call of a torch.export graph: zero the parameters it reads
                gm, _ = graph_module_of(variant)
                if gm is None:
                    raise UserError(f"layer {layer} is a call in a torch.export graph the module does not hold")
                fetch_attr(gm, info.weight)[idx] = 0
                if zero_bias and info.bias is not None:
                    fetch_attr(gm, info.bias)[idx] = 0
                continue
            conv = _find(variant, info.target)
            conv.weight[idx] = 0
            if zero_bias and conv.bias is not None:
                conv.bias[idx] = 0
    return variant


def zeroed_onnx(proto, table, selection: Selection, zero_bias: bool = False):
    """A copy of ``proto`` with the selected filters' Conv weight slices (``W[j]``) zeroed in the initializers; with
    ``zero_bias`` also the Conv's bias: the graph's own, which, where the exporter merged a BatchNorm into the conv,
    is the fused bias, so the zeroed filter's pre-activation becomes 0 rather than the unmerged model's bn(0). A
    file does not say whether that happened: :func:`zero_bias_note` says what was zeroed, and ``ablate``/``sweep``
    results carry it (``"zero_bias"``)."""
    import onnx
    from onnx import numpy_helper

    selection = check_selection(table, selection)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {(n.name or n.output[0]): n for n in out.graph.node if n.op_type == "Conv"}
    for layer, idx in by_layer(selection).items():
        node = nodes[table[layer].target]
        if node.input[1] not in inits or (zero_bias and len(node.input) > 2 and node.input[2] not in inits):
            raise UserError(f"{layer}: the ONNX graph's conv weights are computed, not stored initializers "
                            f"(a quantized graph?); ablate the fp32 model")
        names = [node.input[1]] + ([node.input[2]] if zero_bias and len(node.input) > 2 else [])
        for name in names:
            arr = numpy_helper.to_array(inits[name]).copy()
            arr[idx] = 0
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return out


#: what ``--zero-bias`` means on an ONNX graph whose conv is not followed by a BatchNormalization node
FUSED_BIAS_NOTE = ("on an ONNX graph a Conv's bias may include a BatchNorm shift that the exporter merged into the "
                   "conv (the file does not say), so --zero-bias zeroes that fused bias: the zeroed filter's "
                   "pre-activation is 0, where the unmerged model (state_dict, TorchScript, torch.export) gives "
                   "bn(0); ablate the torch model for bn(0)")


def zero_bias_note(model, table, selection: Selection) -> dict | None:
    """What ``zero_bias`` zeroes where a variant is made from an ONNX graph (``model``: a runtime or a source
    without a torch module; None for a torch model, where the conv's own bias is zeroed and a BatchNorm after it
    gives ``bn(0)``, DESIGN's definition): per layer ``"conv bias"`` (a BatchNormalization node reads the conv's
    output, so the zeroed filter's pre-activation is ``bn(0)``), ``"fused bias"`` (no BatchNormalization follows:
    the bias may hold a merged BatchNorm's shift, zeroed with it) or ``"no bias"``; with :data:`FUSED_BIAS_NOTE`
    where any layer is ``"fused bias"``. None where no layer's bias is in doubt."""
    from ..filters import layer_table

    if isinstance(model, CifarNet) or torch_module_of(model) is not None:
        return None
    source = getattr(model, "source", model)
    if getattr(source, "module", None) is not None:
        return None
    graph = onnx_graph_of(model)
    if graph is None and getattr(source, "onnx_path", None) is not None:
        import onnx

        graph = onnx.load(str(source.onnx_path), load_external_data=False)
    if graph is None:
        return None
    table = graph_table(graph, layer_table(table))
    nodes = {(n.name or n.output[0]): n for n in graph.graph.node if n.op_type == "Conv"}
    readers: dict = {}
    for n in graph.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n.op_type)
    zeroed = {}
    for layer in by_layer(selection):
        node = nodes[table[layer].target]
        if len(node.input) < 3 or not node.input[2]:
            zeroed[layer] = "no bias"
        elif readers.get(node.output[0]) == ["BatchNormalization"]:
            zeroed[layer] = "conv bias"
        else:
            zeroed[layer] = "fused bias"
    if "fused bias" not in zeroed.values():
        return None
    return {"zeroed": zeroed, "note": FUSED_BIAS_NOTE}


def variant_source(source, selection: Selection, zero_bias: bool = False, table=None):
    """``source`` (a :class:`cifarbench.source.ModelSource` with a torch module) with its module replaced by the
    filter-zeroed copy, everything else of its contract kept (fixed batch, classes, mean/std, input size), and a
    digest of its own (the source's digest, the selection and ``zero_bias``)."""
    import dataclasses
    import hashlib

    from ..filters import format_selection

    zeroed = zeroed_model(source.module, selection, zero_bias, source if table is None else table)
    key = f"{source.digest}|zeroed:{format_selection(tuple(selection))}|zero_bias={bool(zero_bias)}"
    return dataclasses.replace(source, module=zeroed, digest=hashlib.sha256(key.encode()).hexdigest())


def variant_runtime(runtime, table, selection: Selection, zero_bias: bool = False):
    """The same backend running the filter-zeroed variant. A runtime with a torch module: a zeroed deep copy of
    it (opened with the same backend, device and precision: a compiled backend compiles the variant). Without
    one, a runtime with an ONNX graph (its ``onnx_graph()`` capability): the graph with the Conv weight slices
    zeroed, run by ``runtime.variant(graph)`` under the same contract (normalization, classes, fixed batch).
    ``table`` names the layers (a LayerTable, a source or a torch module; a zoo net's module also supplies the
    BatchNorm that ``zero_bias`` needs where the exporter folded it into the conv)."""
    from ..filters import layer_table
    from ..runtime import open_runtime

    net = table if isinstance(table, CifarNet) else None
    table = layer_table(table)
    source = getattr(runtime, "source", None)
    backend = getattr(runtime, "backend", None) or runtime.name
    opts = {"device": runtime.device, "precision": getattr(runtime, "precision", "fp32")}
    if source is not None and getattr(source, "module", None) is not None and hasattr(source, "digest"):
        # the source's own module zeroed, under the source's whole contract (fixed batch, classes, mean/std, input
        # size): a fresh in-memory module would lose the contract (a static-batch .pt2 runs only its batch). Its
        # digest names the variant, so a compiled backend's cache never hands back the unzeroed model's artifact.
        return open_runtime(variant_source(source, selection, zero_bias, table), backend=backend, **opts)
    module = torch_module_of(runtime)
    if module is not None:
        return open_runtime(zeroed_model(module, selection, zero_bias, table), backend=backend, **opts)
    graph = onnx_graph_of(runtime)
    if graph is None or not hasattr(runtime, "variant"):
        raise UserError(f"filter-zeroed variants need a torch module or an ONNX graph; backend {runtime.name!r} "
                        f"has neither; use --backend torch or onnxruntime")
    if net is not None and zero_bias:
        # a zoo net's folded BN: the zeroed filter's pre-ReLU value is bn(0), computed from the net (see
        # export.variants); the graph's Conv nodes are the net's convs in order
        from ..export.variants import onnx_variant

        return runtime.variant(onnx_variant(graph, net, selection, zero_bias))
    return runtime.variant(zeroed_onnx(graph, graph_table(graph, table), selection, zero_bias))


def predictions(runtime, data: Dataset, batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> np.ndarray:
    """Predicted class of every image of ``data`` through ``runtime``."""
    out = []
    for i in range(0, len(data), batch_size):
        batch = data.images[i:i + batch_size].float().div_(255)
        out.append(runtime.logits(batch).argmax(1).cpu())
        if progress:
            progress(len(batch))
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def ablate(runtime, model, data: Dataset, selection: Selection, zero_bias: bool = False,
           flipped: int = 256, batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> dict:
    """Per-class accuracy and confusion matrices before and after zeroing ``selection``, and the images among the
    first ``flipped`` that were right before and wrong after. ``difference`` is before - after (the report's).
    ``model``: what names the layers (a :class:`cifarbench.filters.LayerTable`, a source or a torch module)."""
    from ..filters import layer_table

    model = layer_table(model)
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
    result = {
        "filters": selection_json(selection),
        "before": sb, "after": sa, "difference": difference(sb, sa),
        "confusion": {"before": conf_b.tolist(), "after": conf_a.tolist()},
        "flipped": [{"index": int(i), "label": data.classes[labels[i]], "before": data.classes[before[i]],
                     "after": data.classes[after[i]]} for i in flips],
    }
    note = zero_bias_note(runtime, model, selection) if zero_bias else None
    if note:   # on an ONNX graph: what --zero-bias zeroed, said, never silently different from the torch model
        result["zero_bias"] = note
    return result


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
    bias = block.conv.bias
    if bias is None or zero_bias:
        bias = torch.zeros(block.conv.out_channels, device=block.conv.weight.device)
    with torch.no_grad():
        constants = block.act(block.bn(bias.detach().reshape(1, -1, 1, 1).clone())).reshape(-1)
    return _LayerSplit(layer, index, between, next_op, flatten, rest, constants)


def _run(mods, x):
    for m in mods:
        x = m(x)
    return x


def _variant_logits(split: _LayerSplit, a: torch.Tensor, z: torch.Tensor, js: torch.Tensor) -> torch.Tensor:
    """Logits [B, V, classes] of the variants zeroing filters ``js``, from the next op's input ``a`` and its
    output ``z``."""
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


def sweep(runtime, model, data: Dataset, selection: Selection, zero_bias: bool = False,
          batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> dict:
    """Ablate each filter of ``selection`` on its own; ranked results (see :func:`sweep_result`).

    Torch runtimes use the cached-prefix, stacked-suffix computation described in the module docstring, one pass
    over the data for every layer; other runtimes run each variant through the runtime. The fast path needs the
    runtime's torch module to be a zoo net (its layers are a plain chain of conv blocks and pools)."""
    base, confs = sweep_confusions(runtime, model, data, selection, zero_bias, batch_size, progress)
    result = sweep_result(selection, base, confs, data.classes)
    note = zero_bias_note(runtime, model, selection) if zero_bias else None
    if note:
        result["zero_bias"] = note
    return result


def sweep_confusions(runtime, model, data: Dataset, selection: Selection, zero_bias: bool = False,
                     batch_size: int = DEFAULT_BATCH, progress: Progress = None) -> tuple[np.ndarray, list]:
    """The unablated net's confusion matrix and one per filter of ``selection``, in ``selection``'s order
    (whatever that order is: the fast path computes layer by layer, and its results are put back by filter).
    Confusion matrices of disjoint image ranges sum to the whole range's (what sharded sweeps merge)."""
    from ..filters import layer_table

    selection = check_selection(layer_table(model), selection)
    net = torch_module_of(runtime)
    if not isinstance(net, CifarNet):
        nc, labels = len(data.classes), data.labels.numpy()
        base = confusion_matrix(predictions(runtime, data, batch_size, progress), labels, nc)
        return base, [confusion_matrix(predictions(variant_runtime(runtime, model, (f,), zero_bias), data,
                                                   batch_size, progress), labels, nc) for f in selection]
    dev = runtime.device
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
            if getattr(runtime, "channels_last", False):
                x = x.contiguous(memory_format=torch.channels_last)
            # the zoo net's own input normalization, as in CifarNet.forward (the body is run layer by layer here)
            h, base_done = net.normalize(x), False
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
    by_filter = {}
    for layer, idx in layers.items():
        p = torch.cat(var_preds[layer]).numpy()                          # [N, V]
        by_filter.update(((layer, j), confusion_matrix(p[:, v], labels, nc)) for v, j in enumerate(idx))
    # by_layer grouped the filters by layer; the caller's order is the selection's (conv2:0, conv1:0, conv2:1)
    return base, [by_filter[(layer, j)] for layer, j in selection]


def sweep_by_variants(runtime, model, data: Dataset, selection: Selection, zero_bias: bool = False,
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
        # no class gained (lost): no class is named, or the JSON would say one did
        gain = (None, gain[1]) if gain[1] is not None and gain[1] <= 0 else gain
        loss = (None, loss[1]) if loss[1] is not None and loss[1] >= 0 else loss
        rows.append({"layer": layer, "filter": j, "accuracy": s["accuracy"], "drop": sb["accuracy"] - s["accuracy"],
                     "per_class": s["per_class"],
                     "largest_gain": {"class": gain[0], "change": gain[1]},
                     "largest_loss": {"class": loss[0], "change": loss[1]}})
    order = sorted(range(len(rows)), key=lambda r: -rows[r]["drop"])   # stable: ties keep net order
    ranked = [dict(rows[r], rank=k + 1) for k, r in enumerate(order)]
    return {"layers": list(by_layer(selection)), "baseline": sb, "filters": ranked}
