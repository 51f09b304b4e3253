"""torch.compile (Inductor) runtime. On CUDA, ``mode="reduce-overhead"`` captures CUDA graphs per batch size;
``max-autotune`` adds kernel autotuning. The first call of each new batch shape pays the compile."""
from __future__ import annotations

import torch

from ..errors import UserError, error_reason
from .torch_eager import TorchRuntime

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledRuntime(TorchRuntime):
    name = "torch-compile"

    def __init__(self, model, device: str | torch.device = "cpu", mode: str | None = None,
                 precision: str = "fp32", channels_last: bool = True, source=None):
        super().__init__(model, device, channels_last=channels_last, precision=precision, source=source)
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        if mode not in MODES:
            raise UserError(f"unknown torch.compile mode {mode!r}; known: {', '.join(MODES)}")
        self.mode = mode
        if self.source.kind == "torchscript" or any(isinstance(m, torch.jit.ScriptModule)
                                                    for m in self.model.modules()):
            raise UserError(f"{self.source.name} is a TorchScript module, which torch.compile cannot compile; use "
                            f"--backend torch or onnxruntime")
        try:
            self._compiled = torch.compile(self.model, mode=mode, dynamic=False)
        except Exception as exc:  # noqa: BLE001  (torch.compile refuses some modules outright)
            raise UserError(f"torch.compile cannot compile {self.source.name}: {error_reason(exc)}; use "
                            f"--backend torch") from None

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        try:
            out = self._compiled(self._prepare(batch))
        except torch._dynamo.exc.TorchDynamoException as exc:  # tracing or Inductor failed on the first call
            raise UserError(f"torch.compile cannot compile {self.source.name}: {error_reason(exc)}; use "
                            f"--backend torch") from None
        # CUDA-graph outputs live in a pool the next replay overwrites: hand back a copy
        return out.float().clone() if self.mode in ("reduce-overhead", "max-autotune") else out.float()
