"""TensorRT engines built from the ONNX export with the TensorRT Python API (10.x).

An engine is specific to a GPU model and a TensorRT version, so it is cached under a key of (ONNX sha256,
TensorRT version, GPU name, precision, profile) and written with a small header that records the same facts;
:class:`~cifarbench.runtime.tensorrt.TensorRTRuntime` refuses an engine from another GPU or TensorRT version
with one clear line instead of a deserialization failure. The builder uses one optimization profile over the
batch dimension (min 1, opt, max), FP16 and INT8 (entropy calibration on training images) on request, and a
timing cache shared by every build on the same GPU and TensorRT version.

Everything TensorRT-independent here (profiles, keys, headers, calibration batching, error lines) is plain
Python, tested without TensorRT; the parts that call ``tensorrt`` run only where it is installed.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..formats import MAGIC, check_compatible, pack_engine, require_tensorrt, unpack_engine  # noqa: F401
from ..io import atomic_path

DEFAULT_MAX_BATCH = 1024
DEFAULT_OPT_BATCH = 256
WORKSPACE_BYTES = 2 << 30


@dataclass(frozen=True)
class Profile:
    """The optimization profile over the batch dimension of ``[N, 3, S, S]`` (S: the model's input size)."""

    min_batch: int
    opt_batch: int
    max_batch: int
    input_size: int = 32

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        s = self.input_size
        return tuple((b, 3, s, s) for b in (self.min_batch, self.opt_batch, self.max_batch))


def make_profile(max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int | None = None, min_batch: int = 1,
                 input_size: int = 32) -> Profile:
    """min <= opt <= max, each >= 1; ``opt`` defaults to the largest power of two <= min(max, 256)."""
    if min_batch < 1 or max_batch < min_batch:
        raise UserError(f"bad batch profile: min {min_batch}, max {max_batch} (need 1 <= min <= max)")
    if opt_batch is None:
        opt_batch = 1 << (min(max_batch, DEFAULT_OPT_BATCH).bit_length() - 1)
        opt_batch = max(opt_batch, min_batch)
    if not min_batch <= opt_batch <= max_batch:
        raise UserError(f"bad batch profile: opt {opt_batch} outside [{min_batch}, {max_batch}]")
    return Profile(min_batch, opt_batch, max_batch, input_size)


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, precision: str, profile: Profile,
                     calib_sha256: str | None = None, toolchain: dict | None = None) -> str:
    """One engine per (ONNX graph, TensorRT version, GPU model, precision, profile), and per calibration set
    (``calib_sha256``, INT8) and toolchain versions where given."""
    fields = {"onnx": onnx_sha256, "trt": trt_version, "gpu": gpu_name, "precision": precision,
              "profile": asdict(profile)}
    if calib_sha256 is not None:
        fields["calib"] = calib_sha256
    if toolchain is not None:
        fields["toolchain"] = toolchain
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def timing_cache_name(trt_version: str, gpu_name: str) -> str:
    return f"timing-trt{trt_version}-{gpu_slug(gpu_name)}.cache"


def parser_error_line(errors: list[str], what: str) -> str:
    """ONNX parser errors as one line (the first error and how many more)."""
    if not errors:
        return f"TensorRT could not parse {what}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"TensorRT could not parse {what}: {errors[0].strip().splitlines()[0]}{more}"


class CalibrationFeed:
    """Fixed-size calibration batches as contiguous CUDA tensors (TensorRT wants device pointers, one batch
    size); the last partial batch is dropped. The current batch is kept alive until the next request."""

    def __init__(self, images: torch.Tensor, batch: int, device: torch.device | str = "cuda"):
        if len(images) == 0:
            raise UserError("INT8 calibration needs at least one image")
        self.batch = min(batch, len(images))
        self.images, self.device = images, torch.device(device)
        self.count = len(images) // self.batch
        self.index = 0
        self.current: torch.Tensor | None = None

    def next_batch(self) -> torch.Tensor | None:
        if self.index >= self.count:
            return None
        chunk = self.images[self.index * self.batch:(self.index + 1) * self.batch]
        self.index += 1
        self.current = chunk.to(self.device, torch.float32).contiguous()
        return self.current


_require_tensorrt = require_tensorrt  # the old private name


def _calibrator(trt, feed: CalibrationFeed, cache: Path):
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return feed.batch

        def get_batch(self, names):
            batch = feed.next_batch()
            return None if batch is None else [batch.data_ptr()]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            with atomic_path(cache) as tmp:
                tmp.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_engine(onnx_path: str | Path, out: str | Path, precision: str = "fp32", profile: Profile | None = None,
                 calib_images: torch.Tensor | None = None, cache_dir: str | Path | None = None,
                 meta: dict | None = None) -> Path:
    """Build a TensorRT engine from an fp32 ONNX file (or an in-memory proto) and write it, with its header, to
    ``out``. ``meta``: the model's metadata for the header (default: the ONNX file's own); ``calib_images``: the
    graph's own input (already normalized where the model expects it)."""
    from ..checkpoint import file_sha256
    from ..io import scratch_dir
    from .onnx import load_onnx, read_metadata

    if not isinstance(onnx_path, (str, Path)):  # a proto: the parser and the header's sha256 want a file
        import onnx

        with scratch_dir(Path(out).parent, ".cifarbench-trt-") as tmp:
            onnx.save(onnx_path, str(tmp / "model.onnx"))
            return build_engine(tmp / "model.onnx", out, precision, profile, calib_images, cache_dir, meta)
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"TensorRT precision must be fp32, fp16 or int8, got {precision}")
    trt = require_tensorrt()
    onnx_path, out = Path(onnx_path), Path(out)
    meta = {**read_metadata(load_onnx(onnx_path)), **(meta or {})}
    profile = profile or make_profile()
    gpu = torch.cuda.get_device_name()
    cache_dir = Path(cache_dir) if cache_dir else out.parent
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        raise UserError(parser_error_line([str(parser.get_error(i)) for i in range(parser.num_errors)],
                                          str(onnx_path)))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    opt_profile = builder.create_optimization_profile()
    input_name = network.get_input(0).name
    opt_profile.set_shape(input_name, *profile.shapes())
    config.add_optimization_profile(opt_profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 layers fall back to fp16, not fp32, where faster
    if precision == "int8":
        if calib_images is None:
            raise UserError("a TensorRT INT8 engine needs calibration images (--calib N --data ...)")
        config.set_flag(trt.BuilderFlag.INT8)
        feed = CalibrationFeed(calib_images, profile.opt_batch)
        # the calibrator's cache holds the activation ranges of these images: keyed by graph and images both
        from . import images_sha256

        calib_key = hashlib.sha256((file_sha256(onnx_path) + images_sha256(calib_images)).encode()).hexdigest()
        config.int8_calibrator = _calibrator(trt, feed, cache_dir / f"calib-{calib_key[:24]}.cache")
        config.set_calibration_profile(opt_profile)
    timing_path = cache_dir / timing_cache_name(trt.__version__, gpu)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build a {precision} engine for {onnx_path} on {gpu} (see the log above)")
    with atomic_path(timing_path) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    header = {"trt_version": trt.__version__, "gpu": gpu, "onnx_sha256": file_sha256(onnx_path),
              "precision": precision, "profile": asdict(profile), "input": input_name,
              "output": network.get_output(0).name, "meta": meta}
    with atomic_path(out) as tmp:
        tmp.write_bytes(pack_engine(header, bytes(serialized)))
    return out
