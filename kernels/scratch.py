"""Per-worker scratch buffers of the incremental engines (one home for the chain engine, the graph engine and
Winograd's transforms)."""
from __future__ import annotations

import math

import torch


def scratch_buffer(scratch: dict, key, shape: tuple, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, bool]:
    """A ``shape`` buffer from a worker's ``scratch`` dict, grown when too small or of another dtype, kept between
    chunks and calls: fresh multi-megabyte CPU tensors cost a page fault per 4 KiB on first touch (~90,000 per
    net4 map at K=8; reuse: 7 % faster in an A/B run). Returns it and whether it is new (contents undefined)."""
    size = math.prod(shape)
    flat = scratch.get(key)
    fresh = flat is None or flat.numel() < size or flat.dtype != dtype
    if fresh:
        flat = scratch[key] = torch.empty(max(size, 1), dtype=dtype, device=device)
    return flat[:size].view(shape), fresh
