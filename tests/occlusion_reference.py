"""The occlusion map by its definition (DESIGN.md), for tests to check cifarbench against: each patch position's
copy of the image, the K x K patch set to the fill in [0, 1] pixel space, run alone through the unmodified model
(normalized as the model expects), softmax, the target's probability."""
from __future__ import annotations

import numpy as np
import torch


def naive_map(model, image, k, stride, target=None, fill=0.5, mean=None, std=None):
    """``(map, target)``: the map of ``image`` [3, S, S] in [0, 1] for ``target`` (default: the clean
    prediction), one patched copy at a time."""
    def norm(x):
        if mean is None:
            return x
        return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)

    size = image.shape[-1]
    n = (size - k) // stride + 1
    with torch.no_grad():
        clean = torch.softmax(model(norm(image.clone())[None]), 1)[0]  # a copy: a model may write into its input
        target = int(clean.argmax()) if target is None else target
        out = np.zeros((n, n), np.float32)
        for i in range(n):
            for j in range(n):
                x = image.clone()
                x[:, i * stride:i * stride + k, j * stride:j * stride + k] = fill
                out[i, j] = torch.softmax(model(norm(x)[None]), 1)[0, target]
    return out, target
