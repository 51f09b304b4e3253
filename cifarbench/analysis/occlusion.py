"""Occlusion maps (DESIGN.md section 3): slide a K x K patch over the image, record the target probability.

Any classifier cifarbench can open (a :class:`~cifarbench.source.ModelSource`: zoo net, checkpoint, torch module,
TorchScript, ``.pt2``, state_dict with ``arch``, ONNX) on any square input size S it takes: the map side is
``(S - K) // stride + 1``. Three engines compute the same map, chosen by what the runtime *can* do (its
capabilities), never by its name:

* ``dense``: every occluded copy is built on the runtime's device in one tensor op
  (:func:`cifarbench.kernels.triton_occlusion.occluded_batch`) and fed through any :class:`Runtime` in
  memory-bounded chunks (a fixed-batch graph gets exactly its batch: the runtime pads), so compiled backends
  (ONNX Runtime, INT8, TensorRT) serve occlusion too. Works for every runtime.
* ``incremental`` on a torch module (``runtime.torch_module()``, or the source's for ``backend="auto"``):
  recomputes only the windows a patch can change; exact fp32. The zoo nets' plain conv/pool chains run on
  :mod:`cifarbench.kernels.incremental` (its CUDA path fuses the first layer in Triton; on the CPU the two are
  equal within 1 %: net4, K=8, one map, 5 interleaved runs on a loaded 2-core machine, min 4.73 s chain vs
  4.78 s graph, medians 5.26 s vs 5.30 s); any other module runs
  on the layer-graph engine :mod:`cifarbench.kernels.incremental_graph` (residual adds, depthwise convs, any
  geometry). An fp32 ONNX file reaches the same engine through its graph translated to torch
  (:mod:`cifarbench.kernels.onnx_module`; ``engine["graph"]`` and ``why`` say so), and a TorchScript file, which
  torch.fx cannot trace, or a ``torch.export`` ``.pt2``, through its graph exported to ONNX first
  (:func:`_module_via_onnx`). A graph it cannot represent raises ``UnsupportedOp``: ``auto`` goes dense,
  ``incremental`` refuses in one line naming the op.
* ``incremental`` on an int8 ONNX graph (``runtime.precision == "int8"`` and ``runtime.onnx_graph()``, on the
  CPU): the same plan on that graph's int8 convolutions (:mod:`cifarbench.kernels.incremental_int8`), giving that
  runtime's dense maps.

``mode="auto"`` picks the one expected to be faster (see :func:`choose_mode`); every result's ``engine`` says
which engine ran and why (``engine["why"]``).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, error_reason, warn
from .occlusion_result import OcclusionResult  # noqa: F401 (its home is torch-free; re-exported here)

#: the side of CIFAR images, the default input size (a model's own comes from its source)
IMAGE_SIZE = 32
MAX_K = 32  # K is bounded by the input side S; this is S for CIFAR-sized models
MODES = ("auto", "dense", "incremental", "approx")
#: what an engine on an fp32 ONNX file runs (its ``graph`` field and ``why``): the layer-graph engines need a torch
#: module, so the graph is translated (:mod:`cifarbench.kernels.onnx_module`)
TRANSLATED = "ONNX graph translated to torch"
#: the sources whose graphs torch.fx cannot read (TorchScript) or reads as aten ops the IR does not know (a
#: ``torch.export`` program): the layer-graph engines read them through ONNX, and say so
VIA_ONNX = {"torchscript": "TorchScript", "exported-program": "torch.export"}
BASELINES = {"gray": 0.5, "zero": 0.0}
#: occluded 32x32 images per runtime call; bounds activation memory (net4: ~1.2 MB per image in fp32). Larger
#: inputs get proportionally fewer images per call (see :class:`DenseEngine`)
DENSE_CHUNK = {"cpu": 256, "cuda": 8192}
#: (image, position) pairs per incremental step; bounds the window buffers (CUDA: 8 images x 2,048 positions,
#: the step size of the GPU run's 1,000-image measurement)
INCREMENTAL_CHUNK = {"cpu": 160, "cuda": 16384}
#: speed of a dense backend relative to eager torch on the same FLOPs, used by ``auto``. ONNX Runtime fp32 on
#: the CPU measured 1.27x eager on net4 but 0.8x on net2 (5x5 convs), so it counts as equal; TensorRT's 2x is an
#: estimate (no run on hardware yet)
_DENSE_SPEED = {"cuda": {"tensorrt": 2.0}}
#: ``mode="approx"``'s knobs (:mod:`cifarbench.kernels.approx`)
APPROX_OPTIONS = ("tau", "coarse", "approx_precision")


# ---------------------------------------------------------------- inputs


def as_int(value, what: str) -> int:
    """``value`` as an int: an int, a numpy or 0-d torch integer, or an integral float (8.0, as JSON gives it);
    anything else (8.5, "8") is a :class:`UserError` naming ``what``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise UserError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def check_window(k: int, stride: int, size: int = IMAGE_SIZE) -> int:
    """Validate K and stride for ``size`` x ``size`` images; return the map side ``(size - K) // stride + 1``."""
    k, stride = as_int(k, "K"), as_int(stride, "stride")
    if not 1 <= k <= int(size):
        raise UserError(f"K must be between 1 and {size} (the model's {size}x{size} input), got {k}")
    if not 1 <= stride <= int(size):
        # past the image side every stride gives the same one-position map; a huge one would overflow the engines
        raise UserError(f"stride must be between 1 and {size} (the model's {size}x{size} input), got {stride}")
    return (int(size) - k) // stride + 1


def load_image(image, resize: bool = False, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, str | None]:
    """``image`` (a path, or a [3, S, S] / [S, S, 3] array or tensor, uint8 or float in [0, 1]) as a float
    [3, S, S] tensor in [0, 1], and its name (the path) if it has one. ``size``: S, the model's input side."""
    if isinstance(image, (str, Path)):
        from ..images import read_rgb

        path = Path(image)
        if not path.is_file():
            raise UserError(f"{path}: " + ("a folder, not an image file" if path.is_dir() else "no such image file"))
        # read_rgb checks the header's size before decoding (a 12 KB PNG can claim 10000x10000) and scales
        # 16-bit images instead of clipping them
        notes: list[str] = []
        rgb = read_rgb(path, str(path), size=size, resize=resize,
                       hint=f"the model takes {size}x{size} images; pass --resize to scale it", notes=notes)
        for note in notes:
            warn(f"{path}: {note}")
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255), str(path)
    # np.array copies (a PIL image or read-only array gives a writable one; the caller's array is never shared)
    t = torch.as_tensor(np.array(image) if not isinstance(image, torch.Tensor) else image)
    if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] != 3:
        raise UserError(f"expected an RGB image [3, H, W], got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise UserError(f"expected uint8 pixels or float pixels in [0, 1], got {t.dtype}")
    t = t.detach()
    t = t.float().div(255) if t.dtype == torch.uint8 else t.float().clone()  # never the caller's storage
    if bool(torch.isnan(t).any()):
        raise UserError("the image holds NaN pixels")
    if tuple(t.shape[1:]) != (size, size):
        if not resize:
            raise UserError(f"image is {t.shape[2]}x{t.shape[1]}; the model takes {size}x{size} images "
                            f"(use resize=True to scale it, or input_size= for a model that takes other sizes)")
        t = torch.nn.functional.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
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


def resolve_target(target, classes=None) -> int | None:
    """A class index from an index or a class name of ``classes`` (the model's names; default CIFAR-10's);
    ``None`` means the clean prediction. A Python ``int`` is always an index (a model whose classes are named
    "1".."10" has class "3" at index 2: ``target=2`` or ``target="3"``); a string is a class name first, else an
    index written as digits (the CLI's ``--label``). An index without ``classes`` is checked later, against the
    model's class count."""
    if target is None:
        return None
    if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
        if int(target) < 0 or (classes is not None and int(target) >= len(classes)):
            limit = f"0-{len(classes) - 1}" if classes is not None else "indices from 0"
            raise UserError(f"unknown class index {int(target)}; use {limit}")
        return int(target)
    if classes is None:
        from ..data import CLASSES

        names = tuple(CLASSES)
    else:
        names = tuple(str(c) for c in classes)
    text = str(target).strip()
    if text in names:  # exact first: classes "a" and "A" are two classes
        return names.index(text)
    folded = [c.casefold() for c in names]
    hits = [i for i, c in enumerate(folded) if c == text.casefold()]
    if len(hits) > 1:
        raise UserError(f"class {target!r} matches {', '.join(names[i] for i in hits)} when case is ignored; give "
                        f"the name exactly or its index")
    if hits:
        return hits[0]
    # digits are an index, except where the classes are numbers themselves: "0" among classes "1".."10" is
    # neither, rather than index 0 (class "1") read one way and "3" (index 2) the other
    numeric = all(c.strip().lstrip("-").isdigit() for c in names)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names) and not numeric:
        return int(text)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raise UserError(f"unknown class {target!r}; use 0-{len(names) - 1} or one of {shown}")


# ---------------------------------------------------------------- engines


class DenseEngine:
    """Every occluded image through a :class:`Runtime`, at most ``chunk`` 32x32-equivalents per call (an S x S
    image counts (S/32)^2 times, so memory stays bounded at any input size)."""

    mode = "dense"
    kind = "dense"

    def __init__(self, runtime, chunk: int | None = None):
        self.runtime = runtime
        self.device = runtime.device
        self.size = int(runtime.input_size)
        self.classes = tuple(runtime.classes)
        base = chunk or DENSE_CHUNK.get(self.device.type, 256)
        self.chunk = max(1, base * IMAGE_SIZE ** 2 // self.size ** 2) if chunk is None else chunk

    def describe(self) -> dict:
        return {"mode": self.mode, "engine": self.kind, "backend": self.runtime.name,
                "precision": self.runtime.precision, "device": str(self.device),
                "fixed_batch": self.runtime.fixed_batch}

    def clean_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.runtime.logits(images.to(self.device))

    def logits(self, images: torch.Tensor, baselines: torch.Tensor, k: int, stride: int,
               span: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits ``[B, P, classes]`` of every position, or of the row-major positions ``span = (first, last)``
        only (``auto``'s calibration times a few: every position costs a dense engine the same)."""
        from ..kernels.triton_occlusion import occluded_batch

        images, baselines = images.to(self.device), baselines.to(self.device)
        n = (self.size - k) // stride + 1
        first, total = span if span is not None else (0, n * n)
        per_image = max(1, self.chunk // len(images))
        out = []
        for p0 in range(first, total, per_image):
            p1 = min(total, p0 + per_image)
            batch = occluded_batch(images, baselines, k, stride, p0, p1)
            out.append(self.runtime.logits(batch).view(len(images), p1 - p0, -1))
        return torch.cat(out, 1)


class IncrementalEngine:
    """Exact incremental occlusion on a torch module taking [0, 1] pixels: the chain engine of
    :mod:`cifarbench.kernels.incremental` for the zoo nets' conv/pool chains, else the layer-graph engine of
    :mod:`cifarbench.kernels.incremental_graph` (raises its ``UnsupportedOp`` for a graph it cannot run)."""

    mode = "incremental"

    def __init__(self, module, device, chunk: int | None = None, size: int = IMAGE_SIZE, classes=None):
        from ..kernels.incremental import IMAGE_SIZE as CHAIN_SIZE, IncrementalOcclusion, chain_fits

        self.device = torch.device(device)
        self.size = int(size)
        self.classes = tuple(classes) if classes is not None else None
        chunk = chunk or INCREMENTAL_CHUNK.get(self.device.type, 160)
        self.module = module.eval()
        if self.size == CHAIN_SIZE and chain_fits(module):
            self.module = self.module.to(self.device)
            self.kind = "incremental-chain"
            try:
                self.engine = IncrementalOcclusion(self.module, self.device, chunk=chunk)
                return
            except TypeError:  # a chain whose normalization or head the chain engine does not reproduce
                pass
        from ..kernels.incremental_graph import GraphOcclusion

        self.kind = "incremental-graph"
        self.engine = GraphOcclusion(self.module, self.device, chunk=chunk, size=self.size)
        self.module = self.engine.module

    #: what the module was made from when it is not the source's own (an ONNX graph translated to torch)
    graph: str | None = None

    def describe(self) -> dict:
        return {"mode": self.mode, "engine": self.kind, "backend": "torch", "precision": "fp32",
                "device": str(self.device), "triton_first_layer": bool(self.engine.use_triton),
                **({"graph": self.graph} if self.graph else {})}

    @torch.inference_mode()
    def clean_logits(self, images: torch.Tensor) -> torch.Tensor:
        # a copy: a model that normalizes in place (x.sub_(m)) would write into the images the windows read
        return self.module(images.to(self.device, copy=True)).float()

    def logits(self, images, baselines, k, stride):
        return self.engine.logits(images, baselines, k, stride)

    def flops(self, k: int, stride: int) -> int:
        return self.engine.flops(k, stride, size=self.size)

    def dense_flops(self) -> int:
        return self.engine.dense_flops(size=self.size)

    def subset_engine(self):
        """What ``auto``'s calibration times on a subset of positions: the layer-graph engine (its ``logits`` takes
        ``positions=``), for a chain net a layer-graph engine built on the same module. That proxy is justified on
        the CPU only, where the two run the same plan at the same speed (module docstring: 4.73 s chain vs 4.78 s
        graph, net4, K=8); on CUDA the chain's first layer is a Triton kernel, so there whole maps are timed."""
        if self.kind == "incremental-graph":
            return self.engine
        if self.device.type != "cpu":
            return None
        if getattr(self, "_proxy", None) is None:
            from ..kernels.incremental_graph import GraphOcclusion

            self._proxy = GraphOcclusion(self.module, self.device, chunk=self.engine.chunk, size=self.size)
        return self._proxy


class Int8IncrementalEngine(DenseEngine):
    """The incremental plan on the int8 convolutions of an int8 ONNX runtime on the CPU
    (:mod:`cifarbench.kernels.incremental_int8`): the same maps as the dense engine on that runtime, whose
    ``describe`` and clean logits it shares. Raises ``ValueError`` for a graph it cannot read."""

    mode = "incremental"
    kind = "incremental-int8"

    def __init__(self, runtime, chunk: int | None = None):
        from ..kernels.incremental import IMAGE_SIZE as CHAIN_SIZE
        from ..kernels.incremental_int8 import Int8IncrementalOcclusion

        super().__init__(runtime)
        if self.size != CHAIN_SIZE:
            raise ValueError(f"it runs {CHAIN_SIZE}x{CHAIN_SIZE} conv/pool chains, not {self.size}x{self.size} inputs")
        self.engine = Int8IncrementalOcclusion(runtime.onnx_graph(), chunk=chunk or INCREMENTAL_CHUNK["cpu"])

    def describe(self) -> dict:
        # which library ran the int8 convs (oneDNN where torch has it): the same integers either way
        return {**super().describe(), "int8_convs": self.engine.int8_convs}

    def logits(self, images, baselines, k, stride):
        return self.engine.logits(images, baselines, k, stride)

    def flops(self, k: int, stride: int) -> int:
        return self.engine.flops(k, stride)

    def dense_flops(self) -> int:
        return self.engine.dense_flops()


class ApproxEngine:
    """Approximate maps (:mod:`cifarbench.kernels.approx`: adaptive drill-down over the exact graph engine, windows
    in bf16 where the CPU has AMX) on a torch module taking [0, 1] pixels. Only with ``mode="approx"``, never
    chosen by ``auto``; its ``describe()`` names the knobs and every result says how many positions were exact."""

    mode = "approx"
    kind = "approx-graph"

    def __init__(self, module, device, size: int = IMAGE_SIZE, classes=None, tau=None, coarse=None,
                 precision=None):
        from ..kernels.approx import DEFAULT_COARSE, DEFAULT_TAU, ApproxOcclusion, check_knobs, default_precision

        self.device = torch.device(device)
        self.size = int(size)
        self.classes = tuple(classes) if classes is not None else None
        precision = precision or default_precision(self.device)
        tau = DEFAULT_TAU if tau is None else tau
        coarse = DEFAULT_COARSE if coarse is None else coarse
        try:
            check_knobs(tau, coarse, precision)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.engine = ApproxOcclusion(module, self.device, tau=tau, coarse=coarse, precision=precision,
                                      size=self.size)
        self.module = self.engine.engine.module
        self.last_info: dict = {}

    graph: str | None = None  # as IncrementalEngine.graph

    def describe(self) -> dict:
        return {"mode": self.mode, "engine": self.kind, "backend": "torch", "precision": "fp32",
                "device": str(self.device), **self.engine.knobs(), **self.last_info,
                **({"graph": self.graph} if self.graph else {})}

    @torch.inference_mode()
    def clean_logits(self, images: torch.Tensor) -> torch.Tensor:
        # a copy: a model that normalizes in place (x.sub_(m)) would write into the images the windows read
        return self.module(images.to(self.device, copy=True)).float()

    def probability_maps(self, images, baselines, k, stride, targets):
        maps, info = self.engine.probability_maps(images, baselines, k, stride, targets)
        self.last_info = {key: info[key] for key in ("positions", "exact_positions") if key in info}
        return maps


class ChosenEngine:
    """An engine as :func:`make_engine` chose it: the engine itself (every attribute is its) and ``why``, which
    :meth:`describe` adds to the JSON, with ``auto``'s measurement (``auto``) where one decided."""

    def __init__(self, engine, why: str, auto: dict | None = None):
        self.engine, self.why, self.auto = engine, why, auto

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def describe(self) -> dict:
        return {**self.engine.describe(), "why": self.why, **({"auto": self.auto} if self.auto else {})}

    def clean_logits(self, images):
        return self.engine.clean_logits(images)

    def logits(self, images, baselines, k, stride):
        return self.engine.logits(images, baselines, k, stride)


def _incremental_pays(engine, k: int, stride: int, dense_speed: float = 1.0, size: int | None = None) -> bool:
    return _cost_ratio(engine, k, stride, dense_speed, size) < 1.0


def _cost_ratio(engine, k: int, stride: int, dense_speed: float = 1.0, size: int | None = None) -> float:
    """The incremental plan's conv FLOPs, discounted for its gather overhead (x1.15), over the dense backend's
    (every position a whole forward pass) scaled by that backend's speed relative to eager torch."""
    size = size or getattr(engine, "size", IMAGE_SIZE)
    n = ((size - k) // stride + 1) ** 2
    dense = engine.dense_flops()
    if dense <= 0:  # no conv (an MLP): nothing for a plan to skip, and nothing to divide by
        return math.inf
    return engine.flops(k, stride) * 1.15 / (dense * n / dense_speed)


def choose_mode(module, backend: str, device: torch.device, k: int, stride: int, size: int = IMAGE_SIZE) -> str:
    """``incremental`` when its FLOPs, discounted for its gather overhead, undercut the dense backend's FLOPs
    scaled by that backend's measured speed relative to eager torch, and the module's graph can run
    incrementally; else ``dense``."""
    speed = _DENSE_SPEED.get(torch.device(device).type, {}).get(backend, 1.0)
    try:
        engine = IncrementalEngine(module, "cpu", size=size)
    except Exception:  # noqa: BLE001  (UnsupportedOp, or any graph the IR cannot plan: dense runs it)
        return "dense"
    return "incremental" if _incremental_pays(engine, k, stride, speed) else "dense"


# ---------------------------------------------------------------- auto: a measured choice

#: ``$CIFARBENCH_AUTO``: ``measure`` (default) times both exact engines where the FLOP rule is not clear-cut;
#: ``flops`` always takes the FLOP rule (tests that pin ``auto``'s choice; a machine too busy to time anything)
AUTO_POLICIES = ("measure", "flops")
#: FLOP ratios (:func:`_cost_ratio`, incremental over dense) outside which the FLOP rule decides untimed. Measured
#: (2-core CPU, K=8, stride 1): FLOP ratio 0.25 / 0.29 ran at 0.22 / 0.27 of dense's time (net1, a MobileNetV2),
#: 0.65 / 0.75 at 0.51 / 0.51 (net2, ResNet-20): below 0.5 the rule is right by a wide margin, in between the
#: ratio says little about which engine wins on a given machine, so it is timed
FLOPS_CLEAR = (0.5, 1.5)
#: CPU calibration: the dense side times CALIB_SIDE^2 positions (49 of net4's 625 at K=8) and the incremental side
#: at least as many (see :func:`measure_auto`); a map of at most CALIB_SIDE rows, and any map on a GPU (where a map
#: takes milliseconds and small batches would starve it), is timed whole
CALIB_SIDE = 7
#: timed rounds after the incremental engine's warm-up run (it builds the subset's plans); each round times every
#: run once, alternating engines so that a load spike hits both, and each run's best round counts
CALIB_REPEATS = 2
#: a first round slower than this is not repeated (a large net: the calibration stays within a few seconds)
CALIB_SLOW_S = 1.0
#: a first round whose estimates differ by more than this factor is not repeated: the choice is clear
CALIB_CLEAR = 1.5
#: format of the cached decision (in its key: a new format never reads an old record)
CALIB_FORMAT = 1
#: measurements made by this process (tests read it: a cached decision must time nothing)
CALIBRATIONS = {"runs": 0}


def auto_policy() -> str:
    policy = os.environ.get("CIFARBENCH_AUTO", "measure").strip().lower() or "measure"
    if policy not in AUTO_POLICIES:
        raise UserError(f"CIFARBENCH_AUTO must be {' or '.join(AUTO_POLICIES)}, got {policy!r}")
    return policy


def auto_key(source, engine, backend: str, device: torch.device, k: int, stride: int,
             runtime_options: dict | None = None, dense_chunk: int | None = None) -> dict:
    """What a measured ``auto`` decision depends on: the model's content (and the normalization its source adds),
    the incremental engine, K, stride, input size, the dense backend and its chunk, the device, and the machine
    (CPU model, threads, workers) and software (torch, onnx, onnxruntime, cifarbench: the dense side is often
    ONNX Runtime; the engines' revision) that ran it."""
    from .. import __version__
    from ..artifacts import toolchain_versions
    from ..kernels import ENGINES_REVISION
    from ..kernels.incremental import cpu_workers
    from ..timing import cpu_name

    device = torch.device(device)
    return {"format": CALIB_FORMAT, "model": source.digest, "mean": source.mean, "std": source.std,
            "engine": engine.kind, "chunk": getattr(getattr(engine, "engine", None), "chunk", None), "k": int(k),
            "stride": int(stride), "size": int(engine.size), "backend": backend, "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "workers": cpu_workers(),
            "runtime_threads": (runtime_options or {}).get("threads"), "torch": torch.__version__,
            "cifarbench": __version__, "toolchain": toolchain_versions(), "dense_chunk": dense_chunk,
            "engines": ENGINES_REVISION}


def auto_cache_path(key: dict) -> Path:
    """The cached decision for ``key``: ``<cache dir>/auto/<digest of key>.json``."""
    import hashlib
    import json

    from .. import data  # read at call time: tests point data.CACHE_DIR at a temp folder

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(data.CACHE_DIR) / "auto" / f"{digest}.json"


def _read_decision(path: Path, key: dict) -> dict | None:
    import json
    import math

    from ..errors import warn

    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        ok = (isinstance(record, dict) and record.get("key") == json.loads(json.dumps(key, default=str))
              and record.get("choice") in ("incremental", "dense")
              and all(isinstance(record.get(f), (int, float)) and math.isfinite(record[f]) and record[f] > 0
                      for f in ("incremental_ms", "dense_ms"))
              # the choice must be what its own times say (a torn or hand-edited record is measured again)
              and record["choice"] == ("incremental" if record["incremental_ms"] < record["dense_ms"] else "dense"))
    except (OSError, ValueError):
        ok = False
    if not ok:
        warn(f"{path}: damaged auto calibration record; measuring again")
        return None
    return record


class _Untimeable(Exception):
    """The incremental engine cannot be timed on a subset of positions here (its message says why)."""


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_auto(incremental, dense, k: int, stride: int) -> dict:
    """Time ``incremental`` and ``dense`` (both built for the same model and device) on the same positions of one
    image and estimate each one's time per full map, in ms.

    On the CPU the incremental side runs on :meth:`IncrementalEngine.subset_engine`, on positions spread evenly over
    the map (raster order), as many as the full map's first parallel round: ``workers`` steps of
    :meth:`GraphOcclusion.step_positions` each (fewer, a 7 x 7 lattice, overestimated a map 2.5-4.4x on the small
    nets -- one step on one worker, small batches -- and chose dense for a ResNet-20 that ran 1.2x faster
    incremental); its fixed cost per call (the clean pass, timed with no positions) is counted once per map, the
    rest scaled by map positions / timed positions. A dense engine costs the same at every position: a
    :data:`CALIB_SIDE` x :data:`CALIB_SIDE` lattice's worth is timed and scaled (within 6 % of a map on the zoo).
    Runs alternate between the engines (a load spike hits both) and each engine's best run counts; a second
    round is skipped when the first already says one engine is :data:`CALIB_CLEAR` times faster."""
    size = int(dense.size)
    device = torch.device(dense.device)
    n = (size - k) // stride + 1
    total = n * n
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    base = torch.full((1, 3), 0.5, device=device)
    timer = None
    if device.type == "cpu" and n > CALIB_SIDE:
        try:
            timer = incremental.subset_engine()
        except Exception as exc:  # noqa: BLE001  (a chain net the layer-graph IR cannot trace)
            raise _Untimeable(f"no layer-graph proxy to time the {incremental.kind} engine on a subset: "
                              f"{type(exc).__name__}") from None
        if timer is None:
            raise _Untimeable(f"the {incremental.kind} engine cannot time a subset of positions")
    started = time.perf_counter()
    if timer is None:  # whole maps
        count = total
        runs = {"incremental": lambda: incremental.logits(image, base, k, stride),
                "dense": lambda: dense.logits(image, base, k, stride)}
    else:
        workers = max(1, int(getattr(timer, "workers", 1)))
        count = min(total, max(CALIB_SIDE * CALIB_SIDE, workers * timer.step_positions(k, stride, size)))
        positions = np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))
        count = len(positions)
        dense_count = min(total, CALIB_SIDE * CALIB_SIDE)
        runs = {"incremental": lambda: timer.logits(image, base, k, stride, positions=positions),
                "fixed": lambda: timer.logits(image, base, k, stride, positions=positions[:0]),
                "dense": lambda: dense.logits(image, base, k, stride, span=(0, dense_count))}
    # one untimed run each: the incremental plans and buffers for these positions, the dense backend's first-call
    # costs (ONNX Runtime's arena, cuDNN's algorithm search); a cold engine would lose and the loss be cached
    runs["incremental"]()
    runs["dense"]()
    best = {name: float("inf") for name in runs}

    def estimates() -> tuple[float, float]:
        """(incremental, dense) seconds per full map from the best runs so far."""
        if timer is None:
            return best["incremental"], best["dense"]
        fixed = min(best["fixed"], best["incremental"])
        return fixed + (best["incremental"] - fixed) * total / count, best["dense"] * total / dense_count

    repeats = 0
    while repeats < CALIB_REPEATS:
        took = time.perf_counter()
        for name, fn in runs.items():
            best[name] = min(best[name], _timed(fn, device))
        repeats += 1
        inc_s, dense_s = estimates()
        if time.perf_counter() - took > CALIB_SLOW_S or max(inc_s, dense_s) > CALIB_CLEAR * min(inc_s, dense_s):
            break
    CALIBRATIONS["runs"] += 1
    inc_s, dense_s = estimates()
    return {"choice": "incremental" if inc_s < dense_s else "dense", "incremental_ms": round(inc_s * 1e3, 3),
            "dense_ms": round(dense_s * 1e3, 3), "positions": int(count), "map_positions": int(total),
            "repeats": repeats, "calibration_ms": round((time.perf_counter() - started) * 1e3, 1),
            "proxy": None if timer is None or timer is getattr(incremental, "engine", None) else "incremental-graph"}


def _auto_choice(cache: dict, source, backend: str, concrete: str, device, engine, k: int, stride: int, ratio,
                 chunk, options: dict):
    """``(mode, why, record)`` of ``auto`` between ``engine`` (incremental) and the dense engine: the FLOP rule
    where it is clear-cut or measuring is off or impossible, else a measurement (:func:`measure_auto`), cached
    (:func:`auto_cache_path`) per model, machine and K."""
    from ..errors import warn
    from ..io import write_json

    at = f"at K={k}, stride {stride}"
    flops = f"the incremental plan costs {ratio:.0%} of dense's conv FLOPs {at}"
    rule = "incremental" if ratio < 1.0 else "dense"
    policy = auto_policy()
    reason = None
    if policy == "flops":
        reason = "CIFARBENCH_AUTO=flops"
    elif not FLOPS_CLEAR[0] <= ratio <= FLOPS_CLEAR[1]:
        reason = "far from even: not timed"
    elif not hasattr(engine, "subset_engine"):
        reason = f"the {engine.kind} engine cannot time a subset of positions"
    if reason is not None:
        return rule, f"auto: {rule}, as {flops} ({reason})", {"policy": "flops", "flop_ratio": round(ratio, 4)}
    key = auto_key(source, engine, concrete, device, k, stride, options,
                   dense_chunk=chunk or DENSE_CHUNK.get(torch.device(device).type))
    path = auto_cache_path(key)
    record = _read_decision(path, key)
    cached = record is not None
    if record is None:
        if "dense" not in cache:
            cache["dense"] = DenseEngine(_runtime(cache, source, backend, device, options), chunk)
        try:
            measured = measure_auto(engine, cache["dense"], k, stride)
        except _Untimeable as exc:
            return rule, f"auto: {rule}, as {flops} ({exc})", {"policy": "flops", "flop_ratio": round(ratio, 4)}
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory timing a whole map: auto must not fail)
            return rule, f"auto: {rule}, as {flops} (timing failed: {_first_line(exc)})", \
                {"policy": "flops", "flop_ratio": round(ratio, 4)}
        record = {"key": key, **measured, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            write_json(path, record)
        except OSError as exc:
            warn(f"could not cache the auto calibration in {path} ({exc.strerror or exc}); it runs again next time")
    choice = record["choice"]
    when = "cached" if cached else (f"timed now on {record['positions']} of {record['map_positions']} positions in "
                                    f"{record['calibration_ms']:.0f} ms, cached")
    why = (f"auto: {choice}, measured: incremental {record['incremental_ms']:.0f} ms vs dense "
           f"{record['dense_ms']:.0f} ms per map {at} ({when}; conv FLOP ratio {ratio:.0%})")
    info = {"policy": "measure", "flop_ratio": round(ratio, 4), "cached": cached, "file": str(path),
            **{f: record.get(f) for f in ("incremental_ms", "dense_ms", "positions", "map_positions",
                                          "calibration_ms", "proxy", "measured_at")}}
    return choice, why, info


def _is_runtime(model) -> bool:
    from ..runtime import Runtime

    return isinstance(model, Runtime)


def _candidate(cache: dict, source, backend: str, device, chunk, runtime_options: dict):
    """The incremental engine this model and backend can run (built once per ``cache``), or None and why not."""
    if "incremental" in cache:
        return cache["incremental"]
    from ..kernels.graph import UnsupportedOp

    engine, why, translated = None, "", False
    runtime = cache.get("runtime")
    module = None
    if not cache.get("given_runtime") and backend == "auto" and source.module is not None:
        module = source.torch_module()  # auto: incremental needs no runtime, so none is opened unless dense wins
    else:
        runtime = _runtime(cache, source, backend, device, runtime_options)
        module = runtime.torch_module() if runtime.precision == "fp32" else None
        if module is None and runtime.precision == "fp32" and source.module is None and \
                runtime.onnx_graph() is not None:
            # an fp32 ONNX file: the layer-graph engine runs its graph translated to torch (a torch source on an
            # explicit graph backend is not translated: that backend runs it, dense)
            try:
                module, translated = _onnx_module(source, runtime.onnx_graph()), True
            except Exception as exc:  # noqa: BLE001  (UnsupportedOp names the op; auto must still run dense)
                why = f"the incremental engine cannot run {source.name}'s ONNX graph: {_first_line(exc)}"
        elif module is None and runtime.precision == "int8" and runtime.onnx_graph() is not None:
            if runtime.device.type != "cpu":
                why = f"the int8 incremental engine runs on the CPU, not {runtime.device}"
            else:
                try:
                    engine = Int8IncrementalEngine(runtime, chunk)
                except ValueError as exc:
                    why = f"the int8 incremental engine cannot read this graph ({exc})"
        elif module is None:
            why = (f"the incremental engine needs a torch module (--backend torch) or an int8 ONNX graph "
                   f"(--backend onnx-int8); "
                   f"{runtime.name} {runtime.precision} on {runtime.device} has neither")
    graph = TRANSLATED if translated else None
    if module is not None and source.kind in VIA_ONNX and not translated:
        try:
            module, translated, graph = _module_via_onnx(source), True, _via_onnx_label(source)
        except Exception as exc:  # noqa: BLE001  (an op either step cannot represent: auto must still run dense)
            module, why = None, f"the incremental engine cannot run {source.name}'s {_graph_kind(source)}: " \
                                f"{_first_line(exc)}"
    if module is not None:
        module = module if translated else _traceable(source, module)
        try:
            engine = IncrementalEngine(module, runtime.device if runtime is not None else device, chunk,
                                       source.input_size, source.classes)
            engine.graph = graph
        except UnsupportedOp as exc:
            why = f"the incremental engine cannot run {source.name}: {exc}"
        except Exception as exc:  # noqa: BLE001  (a graph the IR mis-reads: auto must still run dense)
            why = (f"the incremental engine failed to plan {source.name} ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''})")
    cache["incremental"] = (engine, why)
    return engine, why


def _approx(cache: dict, source, backend: str, device, options: dict):
    """The approximate engine (one per ``cache``); it needs a torch module the layer-graph IR represents."""
    from ..kernels.graph import UnsupportedOp

    knobs = {key: options.pop(key, None) for key in APPROX_OPTIONS}
    if "approx" in cache:
        return cache["approx"]
    onnx = source.kind == "onnx" and backend in ("auto", "onnxruntime")
    if not onnx and (backend not in ("auto", "torch") or source.module is None):
        raise UserError(f"--mode approx runs on a torch model (--backend auto or torch) or an fp32 ONNX file "
                        f"(--backend auto or onnxruntime), not {source.name} on --backend {backend}; use --mode "
                        f"incremental or dense")
    try:
        if onnx:
            from ..formats import graph_precision, load_onnx

            proto = load_onnx(source.onnx_path)
            if graph_precision(proto) != "fp32":
                raise UserError(f"--mode approx runs on fp32 graphs; {source.name} is {graph_precision(proto)}; "
                                f"use --mode incremental or dense")
        if onnx or source.kind in VIA_ONNX:
            try:
                module = _onnx_module(source, proto) if onnx else _module_via_onnx(source)
            except UnsupportedOp:
                raise
            except Exception as exc:  # noqa: BLE001  (a graph the translation or export mis-reads: one line)
                raise UserError(f"the approximate engine cannot run {source.name}'s "
                                f"{'ONNX graph' if onnx else _graph_kind(source)}: {_first_line(exc)}; "
                                f"use --mode dense") from None
        else:
            module = _traceable(source, source.torch_module())
        engine = ApproxEngine(module, device, source.input_size, source.classes, knobs["tau"], knobs["coarse"],
                              knobs["approx_precision"])
    except UnsupportedOp as exc:
        raise UserError(f"the approximate engine cannot run {source.name}: {exc}; use --mode dense") from None
    if onnx or source.kind in VIA_ONNX:
        engine.graph = TRANSLATED if onnx else _via_onnx_label(source)
    cache["approx"] = engine
    return engine


def _traceable(source, module, own_input: bool = False):
    """``module`` as the graph IR can trace it, taking [0, 1] pixels. By default ``module`` already takes [0, 1]
    pixels (``torch_module()``); a source with ``mean``/``std`` then gives a wrapper whose forward casts its
    buffers to ``x.dtype``, which the IR reads as image-dependent (op ``sub``), so ``source.module`` is wrapped
    again with the same ``(x - mean) / std`` as float32 constants, which trace as one pointwise node.
    ``own_input``: ``module`` takes the model's own input (an ONNX graph translated to torch): that wrapper goes in
    front of ``module`` itself where the source has ``mean``/``std``."""
    inner = module if own_input else source.module
    if source.mean is None or inner is None:
        return module
    from torch import nn

    class Normalized(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = inner
            self.register_buffer("mean", torch.tensor(source.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(source.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    return Normalized().eval()


def _onnx_module(source, proto):
    """An fp32 ONNX graph of ``source`` translated to torch (:mod:`cifarbench.kernels.onnx_module`), on [0, 1]
    pixels; raises ``UnsupportedOp`` naming an op it cannot translate."""
    from ..kernels.onnx_module import onnx_module

    return _traceable(source, onnx_module(proto, source.input_size), own_input=True)


def _graph_kind(source) -> str:
    """"TorchScript graph" or "torch.export graph": what :data:`VIA_ONNX` reads, for messages."""
    return f"{VIA_ONNX[source.kind]} graph"


def _via_onnx_label(source) -> str:
    """What an engine on a :data:`VIA_ONNX` source runs (its ``graph`` field and ``why``)."""
    return f"{_graph_kind(source)} exported to ONNX, translated to torch"


def _module_via_onnx(source):
    """A TorchScript or ``torch.export`` model (:data:`VIA_ONNX`) as the layer-graph IR reads it, on [0, 1]
    pixels: torch.fx cannot trace TorchScript, and a ``torch.export`` program is a graph of aten ops the IR does
    not map, so either is exported to ONNX in memory with torch's TorchScript-based exporter (it runs the model
    once on zeros, in torch's interpreter; no Python of the user's) and translated to torch as an ONNX file is.
    Raises where either step cannot represent an op (the translation's ``UnsupportedOp`` names it)."""
    import io
    import warnings

    import onnx

    buffer = io.BytesIO()
    # on the module's own device: moving it would move the source a dense runtime may share
    weights = next(iter(source.module.parameters()), None)
    device = weights.device if weights is not None else torch.device("cpu")
    x = torch.zeros(source.fixed_batch or 1, 3, source.input_size, source.input_size, device=device)
    # a fixed-batch program keeps its batch (a dynamic axis would hide that its reshapes bake it in)
    dynamic = {} if source.fixed_batch else {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated upstream, and says so
        torch.onnx.export(source.module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], **dynamic)
    module = _onnx_module(source, onnx.load_from_string(buffer.getvalue()))
    _check_reproduces(source, module, device)
    return module


def _check_reproduces(source, module, device) -> None:
    """Raise ``ValueError`` unless ``module`` (a translation of ``source``'s exported graph) gives the source's
    own logits on probe images: random ones, black, white, and one with a gray patch. The exporter drops some
    arguments without a word (``AvgPool2d(divisor_override=...)``, ``softplus``'s ``beta`` and ``threshold``
    were found so), and a map from a different model must never be called exact."""
    s, n = source.input_size, source.fixed_batch or 4
    x = torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(0))
    for i, fill in enumerate((0.0, 1.0)[:n - 1]):
        x[i + 1] = fill
    x[-1, :, s // 4:s // 2, s // 4:s // 2] = 0.5
    with torch.no_grad():
        want = source.torch_module()(x.to(device)).float().cpu()
        got = module(x).float()
    if got.shape != want.shape:
        raise ValueError(f"its ONNX export gives outputs of shape {tuple(got.shape)}, the model {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    if not diff <= 1e-4 * (1 + float(want.abs().max())):
        raise ValueError(f"its ONNX export does not reproduce it (logits differ by up to {diff:.3g}: the exporter "
                         f"dropped or changed an op's arguments)")


def _first_line(exc: Exception) -> str:
    """``UnsupportedOp``'s message as it is (it names the op); any other error with its type."""
    from ..kernels.graph import UnsupportedOp

    text = error_reason(exc)
    return text if isinstance(exc, UnsupportedOp) else f"{type(exc).__name__}: {text}"


def _runtime(cache: dict, source, backend: str, device, runtime_options: dict):
    if "runtime" not in cache:
        from ..artifacts import open_runtime

        cache["runtime"] = open_runtime(source, backend, device, **runtime_options)
    return cache["runtime"]


def make_engine(model, k: int, stride: int = 1, backend: str | None = None, mode: str = "auto", device=None,
                chunk: int | None = None, cache: dict | None = None, **options):
    """An engine for ``model``: a :class:`~cifarbench.source.ModelSource`, a :class:`Runtime`, or anything
    :func:`~cifarbench.source.resolve_source` takes (torch module, zoo name, checkpoint, TorchScript, ``.pt2``,
    state_dict with ``arch=``, ONNX file). ``mode``: ``dense`` runs on every runtime; ``incremental`` runs on a
    torch module (``backend`` auto or torch), an fp32 ONNX file's graph translated to torch (``backend`` auto or
    onnxruntime) or an int8 ONNX graph on the CPU, and is one :class:`UserError` naming why elsewhere; ``auto``
    takes the faster exact engine (the FLOP rule where it is clear-cut, else a cached timing, see
    :func:`_auto_choice`) and never fails where dense works; ``approx`` (``tau``, ``coarse``, ``approx_precision``
    in ``options``) runs :mod:`cifarbench.kernels.approx`. The engine's ``describe()`` says which ran and why.

    ``device``: cpu, cuda or cuda:N (anything else is a UserError). ``cache`` (a dict kept by the caller) reuses
    the source, runtime and engines across K. ``options``: the source's contract (``arch``, ``arch_kw``, ``mean``,
    ``std``, ``classes``, ``input_size``) and runtime options for :func:`open_runtime` (``calib_data``,
    ``threads``, ...)."""
    from ..artifacts import CONTRACT, RUNTIME_OPTIONS, check_options, choose_backend
    from ..runtime import default_device, parse_device

    check_options(options, CONTRACT + tuple(o for o in RUNTIME_OPTIONS if o != "mode") + APPROX_OPTIONS,
                  "make_engine (and occlusion_map)",
                  also=("k", "stride", "backend", "mode", "device", "chunk", "target", "baseline", "resize"))

    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "approx":
        # refused whatever engine auto then picks (ignored by incremental, passed on to open_runtime by dense)
        stray = [key for key in APPROX_OPTIONS if options.pop(key, None) is not None]
        if stray:
            raise UserError(f"{', '.join(stray)}: knob{'s' if len(stray) > 1 else ''} of mode='approx', not of "
                            f"mode={mode!r}")
    cache = {} if cache is None else cache
    device = parse_device(device) if device is not None else default_device()
    contract = {key: options.pop(key) for key in CONTRACT if key in options}
    contract = {key: v for key, v in contract.items() if v is not None}
    if "source" not in cache:
        from ..source import ModelSource, resolve_source

        if contract and (_is_runtime(model) or isinstance(model, ModelSource)):
            # the contract is settled when a model is resolved; here it would be dropped silently
            raise UserError(f"{', '.join(sorted(contract))} apply when a model is opened; this "
                            f"{'Runtime' if _is_runtime(model) else 'ModelSource'} has its contract already "
                            f"(give them to open_runtime / resolve_source, or pass the model itself)")
        if _is_runtime(model):
            cache["runtime"], cache["source"], cache["given_runtime"] = model, model.source, True
        else:
            cache["source"] = model if isinstance(model, ModelSource) else resolve_source(model, **contract)
    source = cache["source"]
    k, stride = as_int(k, "K"), as_int(stride, "stride")
    check_window(k, stride, source.input_size)
    backend = backend or "auto"
    key = ("engine", k, stride, mode)
    if key in cache:
        return cache[key]
    if "runtime" not in cache:
        choose_backend(source, backend, device)  # an unknown or impossible backend fails before any work
    chosen, auto = None, None
    if mode == "approx":
        engine = _approx(cache, source, backend, device, options)
        chosen = ChosenEngine(engine, "--mode approx" + (f" on the {engine.graph}" if engine.graph else ""))
        cache[key] = chosen
        return chosen
    if mode != "dense":
        engine, why_not = _candidate(cache, source, backend, device, chunk, options)
        if engine is None and mode == "incremental":
            raise UserError(f"{why_not or 'the incremental engine cannot run this model'}; use --mode dense")
        on = f" on the {engine.graph}" if getattr(engine, "graph", None) else ""
        if engine is not None and mode == "incremental":
            chosen = ChosenEngine(engine, f"--mode incremental{on}")
        elif engine is not None and engine.dense_flops() <= 0:
            why = "auto: dense, as the model has no convolution (nothing for the incremental plan to skip)"
        elif engine is not None:
            concrete = cache["runtime"].name if "runtime" in cache else choose_backend(source, backend, device)
            speed = _DENSE_SPEED.get(device.type, {}).get(concrete, 1.0)
            ratio = _cost_ratio(engine, k, stride, speed)
            picked, why, auto = _auto_choice(cache, source, backend, concrete, device, engine, k, stride, ratio,
                                             chunk, options)
            if picked == "incremental":
                chosen = ChosenEngine(engine, why + on, auto)
        elif why_not:
            why = f"auto: dense, as {why_not}"
        else:
            why = "auto: dense"
    else:
        why = "--mode dense"
    if chosen is None:
        if "dense" not in cache:
            cache["dense"] = DenseEngine(_runtime(cache, source, backend, device, options), chunk)
        chosen = ChosenEngine(cache["dense"], why, auto if mode == "auto" else None)
    cache[key] = chosen
    return chosen


# ---------------------------------------------------------------- API


def occlusion_maps(engine, images: torch.Tensor, k: int, *, stride: int = 1, baseline="gray", targets=None,
                   names=None, classes=None) -> list[OcclusionResult]:
    """Maps for a batch ``[B, 3, S, S]`` in [0, 1] (S: the model's input side) through one engine (see
    :func:`make_engine`). ``targets``: one class (index or name) for all, a sequence per image, or ``None`` (clean
    prediction); names are the model's (``classes``, default the engine's)."""
    size = int(getattr(engine, "size", IMAGE_SIZE))
    k, stride = as_int(k, "K"), as_int(stride, "stride")
    n = check_window(k, stride, size)
    images = _as_batch(images, size)
    if not len(images):
        return []
    if names is not None:
        names = list(names)
        if len(names) != len(images):
            raise UserError(f"names: {len(names)} for {len(images)} images; give one name per image")
    classes = classes if classes is not None else getattr(engine, "classes", None)
    images = images.to(engine.device, torch.float32)
    bases = baseline_values(baseline, images)
    logits = engine.clean_logits(images).float()
    _warn_if_probabilities(engine, logits)
    clean = torch.softmax(logits, 1)
    _check_finite(clean, "the clean image", names)
    predicted = clean.argmax(1)
    targets = _as_targets(targets)
    if targets is None or isinstance(targets, (str, int)):
        fixed = resolve_target(targets, classes)
        tgt = predicted if fixed is None else torch.full_like(predicted, fixed)
    else:
        if len(targets) != len(images):
            raise UserError(f"{len(targets)} targets for {len(images)} images")
        # None in the list: that image's clean prediction
        tgt = torch.tensor([int(predicted[b]) if t is None else resolve_target(t, classes)
                            for b, t in enumerate(targets)], device=predicted.device)
    if len(tgt) != len(images):
        raise UserError(f"{len(tgt)} targets for {len(images)} images")
    if len(tgt) and int(tgt.max()) >= clean.shape[1]:
        raise UserError(f"class {int(tgt.max())} is out of range: the model has {clean.shape[1]} classes")
    if getattr(engine, "mode", None) == "approx":  # the drill-down needs the target to know where to refine
        maps = engine.probability_maps(images, bases, k, stride, tgt).float().view(-1, n, n)
    else:
        probs = torch.softmax(engine.logits(images, bases, k, stride).float(), -1)
        maps = probs.gather(2, tgt.view(-1, 1, 1).expand(-1, probs.shape[1], 1))[..., 0].view(-1, n, n)
    _check_finite(maps, "an occluded copy", names)
    maps, clean, tgt, predicted, bases = (t.cpu() for t in (maps, clean, tgt, predicted, bases))
    names = names or [None] * len(images)
    described = engine.describe()
    kept = tuple(classes) if classes is not None else None
    return [OcclusionResult(maps[b].numpy().astype(np.float32), float(clean[b, tgt[b]]), int(tgt[b]),
                            int(predicted[b]), int(k), int(stride), [round(float(v), 6) for v in bases[b]],
                            names[b], dict(described), kept) for b in range(len(images))]


def _as_batch(images, size: int) -> torch.Tensor:
    """The API's batch, checked once at the entry: a float [B, 3, S, S] tensor (or array) of pixels in [0, 1].
    uint8 or 0..255 values are refused, not scaled silently (a batch of 0..255 floats gave maps of saturated
    images); NaN pixels are the image's fault and are named as such; a tensor that requires grad is detached."""
    if not isinstance(images, torch.Tensor):
        try:
            images = torch.as_tensor(np.asarray(images))
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"expected a [B, 3, {size}, {size}] float tensor of pixels in [0, 1], got "
                            f"{type(images).__name__}") from None
    images = images.detach()
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise UserError(f"expected [B, 3, {size}, {size}] images (the model's input), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise UserError(f"expected float pixels in [0, 1], got {images.dtype} (divide uint8 images by 255, or "
                        f"use load_image)")
    if len(images):
        if bool(torch.isnan(images).any()):
            raise UserError("the images hold NaN pixels")
        if float(images.min()) < 0 or float(images.max()) > 1:
            raise UserError(f"expected pixels in [0, 1], got values from {float(images.min()):g} to "
                            f"{float(images.max()):g} (0..255 images: divide by 255)")
    return images


def _as_targets(targets):
    """One target (None, a name, an index: int, numpy or 0-d tensor, integral float) or one per image (a list,
    tuple, array or tensor of them), in the plain Python forms :func:`resolve_target` takes."""
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    if isinstance(targets, np.ndarray):
        targets = targets.item() if targets.ndim == 0 else targets.tolist()
    if isinstance(targets, np.generic):
        targets = targets.item()
    if isinstance(targets, float):
        return as_int(targets, "the target class index")
    if isinstance(targets, (list, tuple)):
        return [as_int(t, "a target class index") if isinstance(t, (float, np.generic, torch.Tensor)) else t
                for t in targets]
    return targets


def _warn_if_probabilities(engine, logits: torch.Tensor) -> None:
    """A map is softmax(logits)[target]; a model that ends in its own softmax gets a second one, which flattens
    the map towards 1/C. Said once per engine, since it is legal (and then the map is of softmax(p))."""
    if getattr(engine, "warned_probabilities", False) or not len(logits):
        return
    if bool((logits >= 0).all()) and float((logits.sum(1) - 1).abs().max()) < 1e-4:
        from ..errors import warn

        engine.warned_probabilities = True
        warn("the model's outputs are non-negative and sum to 1 per image: probabilities, not logits; occlusion "
             "maps apply softmax to a model's outputs, so remove the model's final softmax for maps of its "
             "probabilities")


def _check_finite(values: torch.Tensor, what: str, names) -> None:
    """A map is made of probabilities: NaN or infinite logits (NaN weights, an overflowing normalization) give
    none, and a map of NaNs would still look like a result (a "most damaging" patch at 0, 0)."""
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(1)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        which = f" of {names[b]}" if names and names[b] else (f" of image {b}" if len(values) > 1 else "")
        raise UserError(f"the model gives non-finite logits (NaN or infinity) on {what}{which}: no probability "
                        f"to map (check its weights and --mean/--std)")


def add_exact_counts(counts: dict, maps: list) -> None:
    """``--mode approx``: add one :func:`occlusion_maps` call's ``positions`` and ``exact_positions`` (every result
    of a call carries the call's counts) to ``counts``; nothing for the exact engines."""
    if maps and "exact_positions" in maps[0].engine:
        for key in ("positions", "exact_positions"):
            counts[key] = counts.get(key, 0) + int(maps[0].engine[key])


def occlusion_map(model, image, k: int, *, stride: int = 1, baseline="gray", target=None, backend=None,
                  mode: str = "auto", device=None, resize: bool = False, **options) -> OcclusionResult:
    """The occlusion map of one image. ``model``: anything :func:`make_engine` takes (torch module, zoo name,
    checkpoint, TorchScript, ``.pt2``, ONNX, a ModelSource or Runtime); ``image``: a path or a [3, S, S]
    array/tensor in [0, 1] (S: the model's input side); ``target``: class index or name (default: the clean
    prediction); ``baseline``: gray, zero, mean or a value in [0, 1]; ``mode``: auto, dense, incremental.
    ``options``: the input contract (``mean``, ``std``, ``classes``, ``input_size``, ``arch``, ``arch_kw``) and
    runtime options, as for :func:`make_engine`. A module runs in eval mode and float32 (inference: BatchNorm's
    running statistics, no dropout), as a copy where it is not so already: the caller's module is never changed."""
    engine = make_engine(model, k, stride, backend, mode, device, **options)
    tensor, name = load_image(image, resize, engine.size)
    return occlusion_maps(engine, tensor[None], k, stride=stride, baseline=baseline, targets=target,
                          names=[name])[0]


def occlude_dataset_throughput(model, data: str = "cifar10", n: int = 1000, k: int = 8, *, stride: int = 1,
                               mode: str = "auto", backend: str | None = None, device=None, batch: int = 8,
                               data_dir=None) -> dict:
    """Time occlusion maps for the first ``n`` test images of ``data`` (the GPU target: K=8, 1,000 images in
    under 10 s). Returns seconds, maps/s and the engine used; maps are computed (occlusion_maps refuses non-finite
    ones) and discarded."""
    from ..data import load_split

    engine = make_engine(model, k, stride, backend, mode, device)
    ds = load_split(data, "test", data_dir, classes=engine.classes)
    images = ds.float_images()[:n]
    warm = images[:batch].to(engine.device)
    occlusion_maps(engine, warm, k, stride=stride)
    _sync(engine.device)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        occlusion_maps(engine, images[i:i + batch].to(engine.device), k, stride=stride)  # refuses non-finite maps
    _sync(engine.device)
    seconds = time.perf_counter() - start
    return {"images": len(images), "k": k, "stride": stride, "seconds": seconds,
            "maps_per_s": len(images) / seconds, "batch": batch, **engine.describe()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
