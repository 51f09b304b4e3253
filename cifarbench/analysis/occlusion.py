"""Occlusion maps (DESIGN.md section 3): slide a K x K patch over the image, record the target probability.

Two engines compute the same map:

* ``dense``: every occluded copy is built on the runtime's device in one tensor op
  (:func:`cifarbench.kernels.triton_occlusion.occluded_batch`) and fed through any :class:`Runtime` in
  memory-bounded chunks, so compiled backends (ONNX Runtime, INT8, TensorRT) serve occlusion too.
* ``incremental``: :mod:`cifarbench.kernels.incremental` recomputes only the windows a patch can change; exact.
  On torch it is exact fp32; given an ``onnx-int8`` runtime it runs the same plan on that runtime's int8
  convolutions (:mod:`cifarbench.kernels.incremental_int8`) and gives that runtime's dense maps.

``mode="auto"`` picks the one expected to be faster (see :func:`choose_mode`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_SIZE = 32
MAX_K = 32
MODES = ("auto", "dense", "incremental")
BASELINES = {"gray": 0.5, "zero": 0.0}
#: occluded images per runtime call; bounds activation memory (net4: ~1.2 MB per image in fp32)
DENSE_CHUNK = {"cpu": 256, "cuda": 8192}
#: (image, position) pairs per incremental step; bounds the window buffers (CUDA: 8 images x 2,048 positions,
#: the step size of the GPU run's 1,000-image measurement)
INCREMENTAL_CHUNK = {"cpu": 160, "cuda": 16384}
#: speed of a dense backend relative to eager torch on the same FLOPs, used by ``auto``. ONNX Runtime fp32 on
#: the CPU measured 1.27x eager on net4 but 0.8x on net2 (5x5 convs), so it counts as equal; TensorRT's 2x is an
#: estimate (no run on hardware yet)
_DENSE_SPEED = {"cuda": {"tensorrt": 2.0}}


@dataclass
class OcclusionResult:
    """One map: ``map[i, j]`` is the target probability with the patch's top-left corner at (i*stride, j*stride)."""

    map: np.ndarray
    clean_prob: float
    target: int
    predicted: int
    k: int
    stride: int
    baseline: list[float]
    image: str | None = None
    engine: dict = field(default_factory=dict)

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

    def to_dict(self, with_map: bool = True) -> dict:
        from ..data import CLASSES

        out = {"image": self.image, "k": self.k, "stride": self.stride, "target": self.target,
               "target_class": CLASSES[self.target], "predicted": self.predicted,
               "predicted_class": CLASSES[self.predicted], "clean_prob": self.clean_prob,
               "baseline": self.baseline, "map_sum": self.map_sum, "most_damaging": self.most_damaging,
               "engine": self.engine}
        if with_map:
            out["map"] = self.map.tolist()
        return out

    def __getitem__(self, key: str):
        """Dict-style access (``result["map_sum"]``) to the fields of :meth:`to_dict`."""
        return self.map if key == "map" else self.to_dict(with_map=False)[key]


# ---------------------------------------------------------------- inputs


def check_window(k: int, stride: int) -> int:
    """Validate K and stride; return the map side ``(32 - K) // stride + 1``."""
    if not 1 <= int(k) <= MAX_K:
        raise UserError(f"K must be between 1 and {MAX_K}, got {k}")
    if int(stride) < 1:
        raise UserError(f"stride must be at least 1, got {stride}")
    return (IMAGE_SIZE - int(k)) // int(stride) + 1


def load_image(image, resize: bool = False) -> tuple[torch.Tensor, str | None]:
    """``image`` (a path, or a [3, 32, 32] / [32, 32, 3] array or tensor, uint8 or float in [0, 1]) as a float
    [3, 32, 32] tensor in [0, 1], and its name (the path) if it has one."""
    if isinstance(image, (str, Path)):
        from ..images import read_rgb

        path = Path(image)
        if not path.is_file():
            raise UserError(f"{path}: no such image file")
        # read_rgb checks the header's size before decoding (a 12 KB PNG can claim 10000x10000) and scales
        # 16-bit images instead of clipping them
        rgb = read_rgb(path, str(path), size=IMAGE_SIZE, resize=resize,
                       hint=f"the nets take {IMAGE_SIZE}x{IMAGE_SIZE} images; pass --resize to scale it")
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255), str(path)
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] != 3:
        raise UserError(f"expected an RGB image [3, H, W], got shape {tuple(t.shape)}")
    t = t.float().div(255) if t.dtype == torch.uint8 else t.float()
    if tuple(t.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        if not resize:
            raise UserError(f"image is {t.shape[2]}x{t.shape[1]}; the nets take 32x32 images (use resize)")
        t = torch.nn.functional.interpolate(t[None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)[0]
    if t.min() < 0 or t.max() > 1:
        raise UserError("float images must be in [0, 1]")
    return t, None


def baseline_values(baseline, images: torch.Tensor) -> torch.Tensor:
    """Patch colour per image, ``[B, 3]`` in [0, 1]: gray (0.5), zero, mean (the image's channel means) or a
    number in [0, 1]."""
    if isinstance(baseline, str) and baseline in BASELINES:
        return torch.full((len(images), 3), BASELINES[baseline], device=images.device)
    if baseline == "mean":
        return images.mean(dim=(2, 3))
    try:
        value = float(baseline)
    except (TypeError, ValueError):
        raise UserError(f"baseline must be gray, zero, mean or a number in [0, 1], got {baseline!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"baseline value must be in [0, 1], got {value}")
    return torch.full((len(images), 3), value, device=images.device)


def resolve_target(target) -> int | None:
    """A class index from an index or a class name (``cat``); ``None`` means the clean prediction."""
    from ..data import CLASSES

    if target is None:
        return None
    text = str(target).strip()
    if text.lower() in CLASSES:
        return CLASSES.index(text.lower())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(CLASSES):
        return int(text)
    raise UserError(f"unknown class {target!r}; use 0-9 or one of {', '.join(CLASSES)}")


# ---------------------------------------------------------------- engines


class DenseEngine:
    """Every occluded image through a :class:`Runtime`, ``chunk`` images per call."""

    mode = "dense"

    def __init__(self, runtime, chunk: int | None = None):
        self.runtime = runtime
        self.device = runtime.device
        self.chunk = chunk or DENSE_CHUNK.get(self.device.type, 256)

    def describe(self) -> dict:
        return {"mode": self.mode, "backend": self.runtime.name, "precision": self.runtime.precision,
                "device": str(self.device)}

    def clean_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.runtime.logits(images.to(self.device))

    def logits(self, images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int) -> torch.Tensor:
        from ..kernels.triton_occlusion import occluded_batch

        images, baselines = images.to(self.device), baselines.to(self.device)
        n = (IMAGE_SIZE - k) // stride + 1
        total = n * n
        per_image = max(1, self.chunk // len(images))
        out = []
        for p0 in range(0, total, per_image):
            p1 = min(total, p0 + per_image)
            batch = occluded_batch(images, baselines, k, stride, p0, p1)
            out.append(self.runtime.logits(batch).view(len(images), p1 - p0, -1))
        return torch.cat(out, 1)


class IncrementalEngine:
    """The exact incremental engine of :mod:`cifarbench.kernels.incremental` on a torch :class:`CifarNet`."""

    mode = "incremental"

    def __init__(self, module, device, chunk: int | None = None):
        from ..kernels.incremental import IncrementalOcclusion

        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.engine = IncrementalOcclusion(self.module, self.device,
                                           chunk=chunk or INCREMENTAL_CHUNK.get(self.device.type, 160))

    def describe(self) -> dict:
        return {"mode": self.mode, "backend": "torch", "precision": "fp32", "device": str(self.device),
                "triton_first_layer": self.engine.use_triton}

    @torch.inference_mode()
    def clean_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.device)).float()

    def logits(self, images, baselines, k, stride):
        return self.engine.logits(images, baselines, k, stride)


class Int8IncrementalEngine(DenseEngine):
    """The incremental plan on the int8 convolutions of an ``onnx-int8`` runtime on the CPU
    (:mod:`cifarbench.kernels.incremental_int8`): the same maps as the dense engine on that runtime, whose
    ``describe`` and clean logits it shares."""

    mode = "incremental"

    def __init__(self, runtime, chunk: int | None = None):
        from ..kernels.incremental_int8 import Int8IncrementalOcclusion

        self.runtime, self.device = runtime, runtime.device
        self.engine = Int8IncrementalOcclusion(runtime.proto, chunk=chunk or INCREMENTAL_CHUNK["cpu"])

    def logits(self, images, baselines, k, stride):
        return self.engine.logits(images, baselines, k, stride)


def choose_mode(module, backend: str, device: torch.device, k: int, stride: int) -> str:
    """``incremental`` when its FLOPs, discounted for its gather overhead, undercut the dense backend's FLOPs
    scaled by that backend's measured speed relative to eager torch; else ``dense``."""
    from ..kernels.incremental import IncrementalOcclusion

    speed = _DENSE_SPEED.get(device.type, {}).get(backend, 1.0)
    return "incremental" if _incremental_pays(IncrementalOcclusion(module, "cpu"), k, stride, speed) else "dense"


def _incremental_pays(engine, k: int, stride: int, dense_speed: float = 1.0) -> bool:
    n = ((IMAGE_SIZE - k) // stride + 1) ** 2
    return engine.flops(k, stride) * 1.15 < engine.dense_flops() * n / dense_speed


def _int8_engine(runtime, mode: str, k: int, stride: int, chunk: int | None):
    """For an ``onnx-int8`` runtime on the CPU: the int8 incremental engine when ``mode`` asks for it, or when
    ``auto`` and it does fewer FLOPs; ``None`` for dense. Graphs it cannot read go dense under ``auto``."""
    if mode == "dense" or runtime.name != "onnx-int8" or runtime.device.type != "cpu":
        if mode == "incremental":
            raise UserError(f"the incremental engine runs on torch or onnx-int8 on the CPU, not {runtime.name} "
                            f"on {runtime.device}; use --mode dense")
        return None
    try:
        engine = Int8IncrementalEngine(runtime, chunk)
    except ValueError as exc:
        if mode == "incremental":
            raise UserError(f"the incremental engine cannot read this int8 graph ({exc}); use --mode dense") from None
        return None
    return engine if mode == "incremental" or _incremental_pays(engine.engine, k, stride) else None


def make_engine(model, k: int, stride: int = 1, backend: str | None = None, mode: str = "auto", device=None,
                chunk: int | None = None, cache: dict | None = None, **runtime_options):
    """An engine for ``model`` (module, zoo name, checkpoint, artifact or :class:`Runtime`). ``incremental`` runs
    on torch, or on the int8 convolutions of an ``onnx-int8`` runtime; other backends run ``dense``; ``auto``
    chooses by cost (:func:`choose_mode`). ``cache`` (a dict kept by the caller) reuses engines across K, so
    runtimes and artifacts are opened once. ``runtime_options`` go to :func:`open_runtime` (``calib_data``)."""
    from ..runtime import ARTIFACTS, Runtime, default_device, open_runtime, resolve_backend, resolve_module

    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    cache = {} if cache is None else cache
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here")
    artifact = isinstance(model, Runtime) or (isinstance(model, (str, Path)) and Path(model).suffix in ARTIFACTS)
    if not artifact:
        if "module" not in cache:
            cache["module"] = resolve_module(model)
        module = cache["module"]
        concrete = resolve_backend(backend, device)
        if concrete == "torch" or backend in (None, "auto"):
            if mode == "auto":
                mode = choose_mode(module, concrete, device, k, stride)
            if mode == "incremental":
                if "incremental" not in cache:
                    cache["incremental"] = IncrementalEngine(module, device, chunk)
                return cache["incremental"]
        model, backend = module, concrete
    if "runtime" not in cache:
        cache["runtime"] = model if isinstance(model, Runtime) else open_runtime(model, backend, device,
                                                                                 **runtime_options)
    runtime = cache["runtime"]
    key = f"{mode}-{k}-{stride}" if mode == "auto" else mode
    if key not in cache:
        cache[key] = _int8_engine(runtime, mode, k, stride, chunk) or cache.get("dense") or \
            cache.setdefault("dense", DenseEngine(runtime, chunk))
    return cache[key]


# ---------------------------------------------------------------- API


def occlusion_maps(engine, images: torch.Tensor, k: int, *, stride: int = 1, baseline="gray", targets=None,
                   names=None) -> list[OcclusionResult]:
    """Maps for a batch ``[B, 3, 32, 32]`` in [0, 1] through one engine (see :func:`make_engine`).
    ``targets``: one class (index or name) for all, a sequence per image, or ``None`` (clean prediction)."""
    n = check_window(k, stride)
    images = images.to(engine.device, torch.float32)
    bases = baseline_values(baseline, images)
    clean = torch.softmax(engine.clean_logits(images).float(), 1)
    predicted = clean.argmax(1)
    if targets is None or isinstance(targets, (str, int)):
        fixed = resolve_target(targets)
        tgt = predicted if fixed is None else torch.full_like(predicted, fixed)
    else:
        tgt = torch.tensor([resolve_target(t) for t in targets], device=predicted.device)
    probs = torch.softmax(engine.logits(images, bases, k, stride).float(), -1)
    maps = probs.gather(2, tgt.view(-1, 1, 1).expand(-1, probs.shape[1], 1))[..., 0].view(-1, n, n)
    maps, clean, tgt, predicted, bases = (t.cpu() for t in (maps, clean, tgt, predicted, bases))
    names = names or [None] * len(images)
    return [OcclusionResult(maps[b].numpy().astype(np.float32), float(clean[b, tgt[b]]), int(tgt[b]),
                            int(predicted[b]), int(k), int(stride), [round(float(v), 6) for v in bases[b]],
                            names[b], engine.describe()) for b in range(len(images))]


def occlusion_map(model, image, k: int, *, stride: int = 1, baseline="gray", target=None, backend=None,
                  mode: str = "auto", device=None, resize: bool = False) -> OcclusionResult:
    """The occlusion map of one image. ``model``: torch module, zoo name, checkpoint or exported artifact;
    ``image``: a path or a [3, 32, 32] array/tensor in [0, 1]; ``target``: class index or name (default: the
    clean prediction); ``baseline``: gray, zero, mean or a value in [0, 1]; ``mode``: auto, dense, incremental."""
    check_window(k, stride)
    tensor, name = load_image(image, resize)
    engine = make_engine(model, k, stride, backend, mode, device)
    return occlusion_maps(engine, tensor[None], k, stride=stride, baseline=baseline, targets=target,
                          names=[name])[0]


def occlude_dataset_throughput(model, data: str = "cifar10", n: int = 1000, k: int = 8, *, stride: int = 1,
                               mode: str = "auto", backend: str | None = None, device=None, batch: int = 8,
                               data_dir=None) -> dict:
    """Time occlusion maps for the first ``n`` test images of ``data`` (the GPU target: K=8, 1,000 images in
    under 10 s). Returns seconds, maps/s and the engine used; maps are computed, checked finite and discarded."""
    from ..data import load_split

    ds = load_split(data, "test", data_dir)
    images = ds.float_images()[:n]
    engine = make_engine(model, k, stride, backend, mode, device)
    warm = images[:batch].to(engine.device)
    occlusion_maps(engine, warm, k, stride=stride)
    _sync(engine.device)
    start = time.perf_counter()
    total = 0.0
    for i in range(0, len(images), batch):
        results = occlusion_maps(engine, images[i:i + batch].to(engine.device), k, stride=stride)
        total += sum(r.map_sum for r in results)
    _sync(engine.device)
    seconds = time.perf_counter() - start
    if not np.isfinite(total):
        raise RuntimeError("non-finite occlusion maps")
    return {"images": len(images), "k": k, "stride": stride, "seconds": seconds,
            "maps_per_s": len(images) / seconds, "batch": batch, **engine.describe()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
