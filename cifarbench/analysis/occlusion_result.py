"""One occlusion map and what it says (:class:`OcclusionResult`), free of torch so that the figure worker
(:mod:`cifarbench.figure_worker`) and readers of saved results can use it without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class OcclusionResult:
    """One map: ``map[i, j]`` is the target probability with the patch's top-left corner at (i*stride, j*stride).
    ``classes``: the model's class names (None: CIFAR-10's), used for ``target_class``/``predicted_class``."""

    map: np.ndarray
    clean_prob: float
    target: int
    predicted: int
    k: int
    stride: int
    baseline: list[float]
    image: str | None = None
    engine: dict = field(default_factory=dict)
    classes: tuple | None = None

    @property
    def map_sum(self) -> float:
        return float(self.map.sum(dtype=np.float64))

    @property
    def most_damaging(self) -> dict:
        """The position that lowers the target probability most: map index, pixel box and probabilities."""
        i, j = np.unravel_index(int(np.argmin(self.map)), self.map.shape)
        prob = float(self.map[i, j])
        y, x = int(i) * self.stride, int(j) * self.stride
        return {"row": int(i), "col": int(j), "y": y, "x": x, "box": [y, x, y + self.k, x + self.k],
                "prob": prob, "drop": self.clean_prob - prob}

    def class_name(self, index: int) -> str:
        names = self.classes
        if names is None:
            from ..data import CLASSES

            names = CLASSES
        return str(names[index]) if 0 <= index < len(names) else str(index)

    def to_dict(self, with_map: bool = True) -> dict:
        out = {"image": self.image, "k": self.k, "stride": self.stride, "target": self.target,
               "target_class": self.class_name(self.target), "predicted": self.predicted,
               "predicted_class": self.class_name(self.predicted), "clean_prob": self.clean_prob,
               "baseline": self.baseline, "map_sum": self.map_sum, "most_damaging": self.most_damaging,
               "engine": self.engine}
        if with_map:
            out["map"] = self.map.tolist()
        return out

    def __getitem__(self, key: str):
        """Dict-style access (``result["map_sum"]``) to the fields of :meth:`to_dict`."""
        return self.map if key == "map" else self.to_dict(with_map=False)[key]
