"""Filter-response mining (DESIGN section 3): top-K images per filter, max-response patches, dead filters.

One pass over the data serves every layer. Per batch a *probe* returns, for every conv layer, three [B, C]
tensors reduced on the runtime's device: the response (spatial sum of the pre-ReLU map), the flat position of its
first maximum and the maximum itself. The torch probe reads the maps with forward hooks on each block's BN (the
pre-ReLU output; an Identity where the net has no BN); the ONNX probe is a graph with those reductions as extra
outputs (:mod:`cifarbench.export.probe`). Top-K is a streaming selection: the running K best are merged with each
batch by a stable sort, so memory does not grow with the data and ties go to the lower image index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data import Dataset
from ..errors import UserError
from ..filters import Selection, all_filters, by_layer
from ..nets import CifarNet, receptive_patch

DEFAULT_BATCH = 250
Probe = Callable[[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


# ------------------------------------------------------------------------------------------------------ probes
def reduce_map(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, first argmax as y * W + x, max) over the spatial positions of a [B, C, H, W] map, each [B, C]."""
    b, c = pre.shape[:2]
    flat = pre.permute(0, 2, 3, 1).reshape(b, -1, c)   # a view for channels_last maps: no copy
    mx, am = flat.max(1)
    return flat.sum(1), am, mx


def torch_probe(net: CifarNet, channels_last: bool = True) -> Probe:
    """A probe running ``net``'s body (the head is not needed) with a forward hook on every block's BN."""
    blocks = net.conv_blocks()
    names = [n for n, _ in net.layers.named_children()]
    body = net.layers[:names.index(list(blocks)[-1]) + 1]
    found: dict[str, tuple] = {}
    param = next(net.parameters())

    def hook(layer):
        def fn(_module, _inputs, output):
            found[layer] = reduce_map(output)
        return fn

    for layer, block in blocks.items():
        block.bn.register_forward_hook(hook(layer))

    @torch.inference_mode()
    def probe(batch: torch.Tensor):
        found.clear()
        batch = batch.to(param.device, param.dtype)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        body((batch - 0.5) / 0.5)
        return dict(found)

    return probe


def onnx_probe(runtime, model: CifarNet) -> Probe:
    """The runtime's graph with probe outputs, run by the same ONNX Runtime backend on the same device."""
    from ..export.probe import output_names, probe_graph
    from ..export.variants import runtime_proto
    from ..runtime.ort import OrtRuntime

    probed = OrtRuntime(probe_graph(runtime_proto(runtime, model), model), runtime.device)
    layers = list(model.conv_blocks())

    def probe(batch: torch.Tensor):
        outs = probed.outputs(batch.to(probed.device, torch.float32).contiguous())
        return {layer: tuple(outs[name] for name in output_names(layer)) for layer in layers}

    return probe


def probe_for(runtime, model: CifarNet) -> Probe:
    from ..runtime import TorchRuntime

    if type(runtime) is TorchRuntime:
        import copy

        return torch_probe(copy.deepcopy(runtime.model), runtime.channels_last)  # hooks stay off the user's net
    if getattr(runtime, "name", "") == "onnxruntime":
        return onnx_probe(runtime, model)
    raise UserError(f"filter mining is not available for backend {runtime.name!r}; use torch or onnxruntime")


# ------------------------------------------------------------------------------------------------------ top-K
class StreamingTopK:
    """The K largest values per row over a stream of column blocks, with payloads, ties to the lower index."""

    def __init__(self, rows: int, k: int):
        self.k = k
        self.values = torch.empty(rows, 0)
        self.index = torch.empty(rows, 0, dtype=torch.long)
        self.payload = torch.empty(rows, 0, dtype=torch.long)

    def update(self, values: torch.Tensor, offset: int, payload: torch.Tensor) -> None:
        """``values``/``payload`` [rows, B] for items ``offset .. offset + B - 1``."""
        b = values.shape[1]
        index = torch.arange(offset, offset + b).expand(values.shape[0], b)
        # kept items have lower indices than the new ones and are already in order: a stable sort keeps ties ordered
        v = torch.cat([self.values, values.float()], 1)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.values = v.gather(1, order)
        self.index = torch.cat([self.index, index], 1).gather(1, order)
        self.payload = torch.cat([self.payload, payload.long()], 1).gather(1, order)


# ------------------------------------------------------------------------------------------------------ mining
@dataclass
class MiningResult:
    selection: Selection
    top_index: np.ndarray      # [F, K] image indices, best first
    top_response: np.ndarray   # [F, K]
    top_position: np.ndarray   # [F, K, 2] (y, x) of the max in the filter's feature map
    top_patch: np.ndarray      # [F, K, 4] (y0, x0, y1, x1) receptive field of that position, clipped
    labels: np.ndarray         # [F, K] class index of each top image
    classes: tuple[str, ...]
    receptive_fields: dict[str, int]
    dead: Selection            # every filter of the net whose pre-ReLU map is <= 0 everywhere on every image

    def to_json(self) -> dict:
        filters = []
        for f, (layer, j) in enumerate(self.selection):
            hist = np.bincount(self.labels[f], minlength=len(self.classes))
            resp = self.top_response[f]
            filters.append({
                "layer": layer, "filter": j,
                "top": [{"index": int(i), "label": self.classes[c], "response": float(r), "patch": [int(p) for p in pt]}
                        for i, c, r, pt in zip(self.top_index[f], self.labels[f], resp, self.top_patch[f])],
                "class_histogram": {c: int(n) for c, n in zip(self.classes, hist)},
                "max_class": self.classes[int(hist.argmax())] if len(resp) else None,
                "mean_top_response": float(resp.mean()) if len(resp) else None,
                "max_response": float(resp[0]) if len(resp) else None,
            })
        return {"filters": filters, "receptive_fields": dict(self.receptive_fields),
                "dead_filters": [{"layer": layer, "filter": j} for layer, j in self.dead]}


def mine(runtime, model: CifarNet, data: Dataset, selection: Selection, k: int = 20,
         batch_size: int = DEFAULT_BATCH, probe: Probe | None = None, progress=None) -> MiningResult:
    """Top-``k`` images of each selected filter by response, their max-response patches, and the net's dead
    filters, in one pass over ``data`` through ``runtime``."""
    if k < 1:
        raise UserError(f"--top must be at least 1, got {k}")
    if not selection:
        raise UserError("no filters selected")
    probe = probe or probe_for(runtime, model)
    layers = by_layer(selection)
    selection = tuple((layer, j) for layer, idx in layers.items() for j in idx)
    channels = {n: b.conv.out_channels for n, b in model.conv_blocks().items()}
    cols = {layer: torch.tensor(idx) for layer, idx in layers.items()}
    tops = {layer: StreamingTopK(len(idx), k) for layer, idx in layers.items()}
    peak = {layer: torch.full((c,), -torch.inf) for layer, c in channels.items()}
    for i in range(0, len(data), batch_size):
        batch = data.images[i:i + batch_size].float().div_(255)
        stats = probe(batch)
        for layer, (s, am, mx) in stats.items():
            peak[layer] = torch.maximum(peak[layer], mx.amax(0).float().cpu())
            if layer in tops:
                c = cols[layer].to(s.device)
                tops[layer].update(s[:, c].T.cpu(), i, am[:, c].T.cpu())
        if progress:
            progress(len(batch))
    geometry = model.geometry()
    idx, resp, pos, patch = [], [], [], []
    for layer, top in tops.items():
        width = geometry[layer].out_size
        y, x = top.payload // width, top.payload % width
        idx.append(top.index), resp.append(top.values), pos.append(torch.stack([y, x], -1))
        patch.append(torch.tensor([[receptive_patch(geometry[layer], int(a), int(b)) for a, b in zip(ys, xs)]
                                   for ys, xs in zip(y.tolist(), x.tolist())], dtype=torch.long).reshape(*y.shape, 4))
    top_index = torch.cat(idx).numpy()
    dead = tuple(f for f in all_filters(model) if peak[f[0]][f[1]] <= 0)
    return MiningResult(selection, top_index, torch.cat(resp).numpy(), torch.cat(pos).numpy(),
                        torch.cat(patch).numpy(), data.labels.numpy()[top_index], tuple(data.classes),
                        model.receptive_fields(), dead)
