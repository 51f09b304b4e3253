"""Parity: every backend against a reference (torch fp32 eager for a torch source, ONNX Runtime fp32 for an ONNX
source) on the same images, with per-precision tolerances.

fp32 backends must match the reference logits to ~1e-4 (scaled by the logits' magnitude: a trained net's logits
reach ~20, where fp32 reassociation alone moves them by a few 1e-6 relative). Reduced precisions cannot match
logits that closely, so they are judged the way they are used: top-1 agreement with fp32 and the error of the
softmax probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

#: fp32: max |logit error| <= LOGITS_ATOL * max(1, max |reference logit|)
LOGITS_ATOL = 1e-4
#: reduced precisions: minimum top-1 agreement and maximum probability error (max for fp16/bf16, mean for int8)
TOLERANCES = {
    "fp32": {"logits_max_abs_scaled": LOGITS_ATOL},
    "fp16": {"top1_agreement": 0.99, "probs_max_abs": 0.05},
    "bf16": {"top1_agreement": 0.99, "probs_max_abs": 0.1},
    "int8": {"top1_agreement": 0.99, "probs_mean_abs": 0.02},
}


def error_metrics(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Max/mean abs and rel error of logits and softmax probabilities, and top-1 agreement.

    Relative errors are norm-wise (error over the reference's magnitude): element-wise ratios explode on
    logits that happen to sit near zero and say nothing about the model.
    """
    ref, out = reference.double().cpu(), logits.double().cpu()
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch {tuple(ref.shape)} vs {tuple(out.shape)}")
    metrics = {}
    for kind, a, b in (("logits", ref, out), ("probs", ref.softmax(1), out.softmax(1))):
        diff = (a - b).abs()
        metrics[f"{kind}_max_abs"] = diff.max().item()
        metrics[f"{kind}_mean_abs"] = diff.mean().item()
        metrics[f"{kind}_max_rel"] = diff.max().item() / max(a.abs().max().item(), 1e-12)
        metrics[f"{kind}_mean_rel"] = diff.mean().item() / max(a.abs().mean().item(), 1e-12)
    metrics["logits_max_abs_scaled"] = metrics["logits_max_abs"] / max(1.0, ref.abs().max().item())
    metrics["top1_agreement"] = (ref.argmax(1) == out.argmax(1)).double().mean().item()
    return metrics


def judge(metrics: dict[str, float], precision: str) -> tuple[bool, list[str]]:
    """Pass/fail against :data:`TOLERANCES`, with a line per violated bound."""
    failures = []
    for key, bound in TOLERANCES[precision].items():
        value = metrics[key]
        ok = value >= bound if key == "top1_agreement" else value <= bound
        if not ok:
            failures.append(f"{key} {value:.3g} {'<' if key == 'top1_agreement' else '>'} {bound:g}")
    return not failures, failures


@dataclass(frozen=True)
class BackendSpec:
    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.precision}"


def parse_backends(text: str) -> list[BackendSpec]:
    """``"torch,onnxruntime,tensorrt:fp16"`` -> specs; precision defaults to the backend's own."""
    from .runtime import BACKENDS

    specs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        backend, _, precision = item.partition(":")
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r} in {text!r}; choose from {', '.join(BACKENDS)}")
        precision = precision or ("int8" if backend == "onnx-int8" else "fp32")
        if precision not in TOLERANCES:
            raise UserError(f"unknown precision {precision!r} in {item!r}; choose from {', '.join(TOLERANCES)}")
        specs.append(BackendSpec(backend, precision))
    if not specs:
        raise UserError("no backends given")
    return specs


def default_backends(device: torch.device) -> list[BackendSpec]:
    """Every backend that can run on ``device`` here."""
    from .runtime import _tensorrt_available

    names = ["torch", "torch-compile", "aoti", "onnxruntime", "onnx-int8"]
    specs = [BackendSpec(n, "int8" if n == "onnx-int8" else "fp32") for n in names]
    if device.type == "cuda":
        from .runtime.ort import available_providers

        if "CUDAExecutionProvider" not in available_providers():
            specs = [s for s in specs if not s.backend.startswith("onnx")]
        specs += [BackendSpec("torch", "fp16"), BackendSpec("torch-compile", "fp16")]
        if _tensorrt_available():
            specs += [BackendSpec("tensorrt", p) for p in ("fp32", "fp16", "int8")]
    return specs


def verify(model, specs: list[BackendSpec], images: torch.Tensor, device: torch.device, batch: int = 256,
           step=None, reference: BackendSpec | None = None, atol: float | None = None, rtol: float | None = None,
           min_top1: float | None = None, **options) -> dict:
    """Run every backend on ``images`` ([0, 1] pixels of the model's size) and compare with a reference.

    ``model``: a :class:`~cifarbench.source.ModelSource` or anything resolve_source takes (``arch``, ``mean``,
    ``std``, ``classes``, ``input_size`` in ``options`` go to it), resolved once. ``reference``: default torch fp32
    eager on the CPU (contiguous) for a torch source, ONNX Runtime fp32 on the CPU of the same file for an ONNX
    source. ``atol``/``rtol``: element-wise bounds ``|out - ref| <= atol + rtol * |ref|`` replacing the fp32
    default (the style of Polygraphy's ``--atol/--rtol``); ``min_top1``: a top-1 agreement bound for every
    precision. ``step(label)``, if given, is called before each backend (the CLI advances its progress bar)."""
    from .artifacts import CONTRACT, open_runtime
    from .runtime import TorchRuntime
    from .source import resolve_source

    contract = {k: options.pop(k) for k in CONTRACT if k in options}
    source = resolve_source(model, **{k: v for k, v in contract.items() if v is not None})
    if reference is None:
        reference = BackendSpec("torch" if source.module is not None else "onnxruntime", "fp32")
    if reference == BackendSpec("torch", "fp32"):
        ref_rt = TorchRuntime(source, "cpu", channels_last=False)
        label = "torch fp32 eager (cpu)"
    else:
        ref_rt = open_runtime(source, reference.backend, device="cpu" if reference.backend != "tensorrt" else device,
                              precision=reference.precision, **options)
        label = f"{ref_rt.name} {ref_rt.precision} ({ref_rt.device})"
    ref = _logits(ref_rt, images, batch)
    results = []
    for spec in specs:
        if step:
            step(spec.label)
        rt = open_runtime(source, spec.backend, device=device, precision=spec.precision, **options)
        out = _logits(rt, images, batch)
        metrics = error_metrics(ref, out)
        passed, failures = judge(metrics, rt.precision)
        tolerance = dict(TOLERANCES[rt.precision])
        if atol is not None or rtol is not None:
            a, r = atol or 0.0, rtol or 0.0
            excess = ((out.double() - ref.double()).abs() - (a + r * ref.double().abs())).max().item()
            metrics["tolerance_excess"] = max(excess, 0.0)
            tolerance = {"atol": a, "rtol": r}
            failures = [f for f in failures if not f.startswith("logits_max_abs_scaled")]
            if excess > 0:
                failures.append(f"|out - ref| exceeds atol {a:g} + rtol {r:g} * |ref| by {excess:.3g}")
        if min_top1 is not None:
            tolerance["top1_agreement"] = min_top1
            failures = [f for f in failures if not f.startswith("top1_agreement")]
            if metrics["top1_agreement"] < min_top1:
                failures.append(f"top1_agreement {metrics['top1_agreement']:.3g} < {min_top1:g}")
        passed = not failures
        results.append({"backend": rt.name, "precision": rt.precision, "device": str(rt.device),
                        "passed": passed, "failures": failures, "tolerance": tolerance, **metrics})
    return {"net": source.name, "images": len(images), "reference": label,
            "results": results, "passed": all(r["passed"] for r in results)}


def _logits(rt, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([rt.logits(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])
