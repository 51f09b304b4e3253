"""ONNX Runtime: CPU, CUDA and TensorRT execution providers behind the :class:`Runtime` interface.

Built from an ONNX path, bytes or an in-memory ``onnx.ModelProto`` (the ablation and probe builders edit graphs
in memory and run them without touching disk). On CPU the session runs with ``ORT_ENABLE_ALL`` (conv+BN folding,
NCHWc layouts) and one intra-op thread per core. On CUDA, inputs and outputs stay on the device through
IOBinding, so a batch never round-trips through host memory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from ..nets import IMAGE_SIZE
from .base import Runtime

#: (source, claimed precision) pairs already warned about
_WARNED: set = set()
#: execution providers in order of preference per device type
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def choose_providers(device: torch.device, available: list[str], tensorrt_ep: bool = False) -> list:
    """The provider list for ``device``; a CUDA device without a CUDA-capable onnxruntime is a :class:`UserError`."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise UserError(f"onnxruntime cannot run on {device}")
    if "CUDAExecutionProvider" not in available:
        raise UserError("onnxruntime here has no CUDA execution provider (install onnxruntime-gpu) — "
                        "use --device cpu or another backend")
    options = {"device_id": device.index or 0}
    providers = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    if tensorrt_ep:
        if "TensorrtExecutionProvider" not in available:
            raise UserError("onnxruntime here has no TensorRT execution provider")
        providers.insert(0, ("TensorrtExecutionProvider", {**options, "trt_engine_cache_enable": True}))
    return providers


def session_options(threads: int | None = None, profile: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling = profile
    return so


class OrtRuntime(Runtime):
    """``graph``: an ONNX path, bytes, an ``onnx.ModelProto`` or an ONNX :class:`~cifarbench.source.ModelSource`.
    ``source``: the contract to run it under (a torch source whose export this is, or the source of the graph an
    edited copy was made from); default: the graph's own (its cifarbench metadata, else plain [0, 1] pixels)."""

    name = "onnxruntime"

    def __init__(self, graph, device: str | torch.device = "cpu", threads: int | None = None,
                 tensorrt_ep: bool = False, source=None):
        import onnxruntime as ort

        from ..errors import warn
        from ..formats import graph_io, graph_precision, load_onnx, read_metadata
        from ..source import ModelSource

        if isinstance(graph, ModelSource):
            source, graph = graph, graph.onnx_path
            if graph is None:
                raise UserError(f"{source.name} is not an ONNX model; open it with open_runtime")
        self.device = torch.device(device)
        self.threads, self.tensorrt_ep = threads, tensorrt_ep
        self.path = Path(graph) if isinstance(graph, (str, Path)) else None
        what = str(self.path) if self.path else "the ONNX model"
        proto = load_onnx(graph)
        # shapes first, before a session or any work: a graph that is not [N, 3, S, S] -> [N, C] fails here
        contract = graph_io(proto, what)
        self.proto = proto  # the graph itself: variant and probe builders edit a copy of it
        self.metadata = read_metadata(proto)
        self.source = source if source is not None else _graph_source(proto, self.path, contract, self.metadata)
        if (contract["input_size"] or self.source.input_size, contract["num_classes"]) != \
                (self.source.input_size, self.source.num_classes):  # a graph of any size runs the source's
            raise UserError(f"{what} takes {contract['input_size']}x{contract['input_size']} images and outputs "
                            f"{contract['num_classes']} classes, but {self.source.name} takes "
                            f"{self.source.input_size}x{self.source.input_size} and outputs "
                            f"{self.source.num_classes}")
        # the graph says what it computes; metadata is only a claim (a hand-edited fp32 file may say int8)
        self.precision = graph_precision(proto)
        claimed = self.metadata.get("precision")
        if claimed and claimed != self.precision and (what, claimed) not in _WARNED:
            _WARNED.add((what, claimed))  # once per file, not once per variant of a sweep
            warn(f"{what}: its metadata says {claimed} but its graph is {self.precision}; "
                 f"treating it as {self.precision}")
        if self.precision == "int8":
            self.name = "onnx-int8"
        self.input_name = contract["input"]
        # a graph exported with a fixed batch N runs N images a call: larger batches are split, smaller padded;
        # so does a graph that declares a dynamic batch but runs one image only (found when its source was probed)
        self.fixed_batch = self.max_batch = contract["batch"] or self.source.fixed_batch
        self.output_names = [o.name for o in proto.graph.output]
        providers = choose_providers(self.device, available_providers(), tensorrt_ep)
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), session_options(threads),
                                                providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types for a bad model
            raise UserError(f"onnxruntime cannot load {what}: {str(exc).splitlines()[0][:200]}") from None
        self.providers = self.session.get_providers()
        if self.device.type == "cuda":
            self._binding = self.session.io_binding()

    def onnx_path(self):
        return self.path

    def onnx_graph(self):
        return self.proto

    def variant(self, graph) -> "OrtRuntime":
        """A runtime for an edited copy of this runtime's graph (a zeroed filter, probe outputs), under the same
        contract (normalization, classes), device and threads."""
        return OrtRuntime(graph, self.device, threads=self.threads, tensorrt_ep=self.tensorrt_ep, source=self.source)

    def outputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every graph output (probe graphs have several) for a checked, contiguous batch on ``self.device``."""
        if self.device.type == "cuda":
            return self._run_bound(batch)
        try:
            results = self.session.run(self.output_names, {self.input_name: batch.numpy()})
        except Exception as exc:  # noqa: BLE001  (ORT's own error types: the graph failed on this input)
            from ..errors import error_reason

            raise UserError(f"{self.source.name} failed on a batch of {tuple(batch.shape)} in onnxruntime: "
                            f"{error_reason(exc)}") from None
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, results)}

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        return self.outputs(batch)[self.output_names[0]].float()

    def _run_bound(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """IOBinding: ORT reads the input from, and writes every output into, CUDA memory owned by torch."""
        binding, index = self._binding, self.device.index or 0
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_input(self.input_name, "cuda", index, _NUMPY[torch.float32], tuple(batch.shape),
                           batch.data_ptr())
        outs = {}
        for out in self.session.get_outputs():
            dtype = _ORT_TYPES[out.type]
            shape = [len(batch) if not isinstance(d, int) else d for d in out.shape]
            outs[out.name] = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(out.name, "cuda", index, _NUMPY[dtype], shape, outs[out.name].data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the input was written on torch's stream
        self.session.run_with_iobinding(binding)
        return outs


def _graph_source(proto, path, contract: dict, metadata: dict):
    """The contract of a graph opened without a source: its cifarbench metadata, else plain [0, 1] pixels."""
    import hashlib

    from ..source import file_digest, source_from_contract

    digest = file_digest(path) if path else hashlib.sha256(proto.SerializeToString()).hexdigest()
    name = metadata.get("net") or (path.stem if path else "onnx-graph")
    return source_from_contract("onnx", name, input_size=contract["input_size"] or IMAGE_SIZE,
                                num_classes=contract["num_classes"], metadata=metadata, path=path, onnx_path=path,
                                fixed_batch=contract["batch"], digest=digest)


def _numpy_types():
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


_NUMPY = _numpy_types()
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
              "tensor(int32)": torch.int32}
