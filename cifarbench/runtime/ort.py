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
    name = "onnxruntime"

    def __init__(self, source, device: str | torch.device = "cpu", threads: int | None = None,
                 tensorrt_ep: bool = False):
        import onnxruntime as ort

        from ..errors import warn
        from ..export.onnx import graph_io, graph_precision, load_onnx, read_metadata

        self.device = torch.device(device)
        proto = load_onnx(source)
        self.source = str(source) if isinstance(source, (str, Path)) else "in-memory"
        # shapes first, before a session or any work: a 64x64 or 100-class model fails here, in one line
        contract = graph_io(proto, self.source if self.source != "in-memory" else "the ONNX model")
        self.proto = proto  # the graph itself: variant and probe builders edit a copy of it
        self.metadata = read_metadata(proto)
        self.net = self.metadata.get("net", "")
        # the graph says what it computes; metadata is only a claim (a hand-edited fp32 file may say int8)
        self.precision = graph_precision(proto)
        claimed = self.metadata.get("precision")
        if claimed and claimed != self.precision and (self.source, claimed) not in _WARNED:
            _WARNED.add((self.source, claimed))  # once per file, not once per variant of a sweep
            warn(f"{self.source}: its metadata says {claimed} but its graph is {self.precision}; "
                 f"treating it as {self.precision}")
        if self.precision == "int8":
            self.name = "onnx-int8"
        self.input_name = contract["input"]
        self.input_size, self.num_classes = contract["input_size"], contract["num_classes"]
        # a graph exported with a fixed batch N runs N images a call: larger batches are split, smaller padded
        self._fixed_batch = self.max_batch = contract["batch"]
        self.output_names = [o.name for o in proto.graph.output]
        providers = choose_providers(self.device, available_providers(), tensorrt_ep)
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), session_options(threads),
                                                providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types for a bad model
            raise UserError(f"onnxruntime cannot load {self.source}: {str(exc).splitlines()[0][:200]}") from None
        self.providers = self.session.get_providers()
        if self.device.type == "cuda":
            self._binding = self.session.io_binding()

    def outputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every graph output (probe graphs have several) for a checked, contiguous batch on ``self.device``."""
        if self.device.type == "cuda":
            return self._run_bound(batch)
        results = self.session.run(self.output_names, {self.input_name: batch.numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, results)}

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        n = len(batch)
        if self._fixed_batch and n < self._fixed_batch:  # pad with copies, keep the first n rows
            batch = torch.cat([batch, batch[-1:].expand(self._fixed_batch - n, -1, -1, -1)]).contiguous()
        return self.outputs(batch)[self.output_names[0]].float()[:n]

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


def _numpy_types():
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


_NUMPY = _numpy_types()
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
              "tensor(int32)": torch.int32}
