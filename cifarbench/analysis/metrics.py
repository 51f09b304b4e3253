"""Classification metrics shared by ``evaluate`` and ``ablate``: confusion matrices and per-class accuracy.

Confusion matrices are int64 ``[true class, predicted class]`` counts. Accuracies are fractions in [0, 1]; a class
without test images has accuracy ``None`` (JSON-safe, unlike NaN).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def confusion_matrix(preds, labels, n_classes: int) -> np.ndarray:
    """``conf[t, p]`` = number of images of true class ``t`` predicted as ``p``."""
    preds, labels = _as_int64(preds), _as_int64(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in shape")
    if preds.size and (preds.min() < 0 or preds.max() >= n_classes or labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"class index outside 0..{n_classes - 1}")
    flat = np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def accuracy(conf: np.ndarray) -> float | None:
    total = int(conf.sum())
    return float(np.trace(conf)) / total if total else None


def per_class_accuracy(conf: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """Recall of each class: correct / images of that class."""
    if conf.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {conf.shape} does not match {len(classes)} classes")
    support = conf.sum(axis=1)
    return {c: (float(conf[i, i]) / int(support[i]) if support[i] else None) for i, c in enumerate(classes)}


def summary(conf: np.ndarray, classes: Sequence[str]) -> dict:
    """``{"accuracy": f, "per_class": {class: f}}``, the shape used in every JSON result."""
    return {"accuracy": accuracy(conf), "per_class": per_class_accuracy(conf, classes)}


def difference(before: dict, after: dict) -> dict:
    """``before - after`` for a pair of :func:`summary` results (positive = accuracy lost), as the report's Table 1."""

    def sub(a, b):
        return None if a is None or b is None else a - b

    return {"accuracy": sub(before["accuracy"], after["accuracy"]),
            "per_class": {c: sub(v, after["per_class"][c]) for c, v in before["per_class"].items()}}


def _as_int64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64).ravel()
