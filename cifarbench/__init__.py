"""cifarbench: the four CIFAR-10 nets of a course report, compiled and analysed fast."""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402

_ZOO = ("create_model", "list_models", "load_model")


def __getattr__(name):
    """The zoo's functions, imported on first use: the zoo imports torch, and ``import cifarbench`` stays light."""
    if name in _ZOO:
        from . import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def occlusion_map(model, image, k, **kwargs):
    """See :func:`cifarbench.analysis.occlusion.occlusion_map` (imported on first use to keep start-up light)."""
    from .analysis.occlusion import occlusion_map as _occlusion_map

    return _occlusion_map(model, image, k, **kwargs)


def open_runtime(model, backend="auto", device=None, precision="fp32", **options):
    """See :func:`cifarbench.artifacts.open_runtime` (imported on first use to keep start-up light)."""
    from .artifacts import open_runtime as _open_runtime

    return _open_runtime(model, backend, device, precision, **options)


def resolve_source(spec, **contract):
    """See :func:`cifarbench.source.resolve_source`."""
    from .source import resolve_source as _resolve_source

    return _resolve_source(spec, **contract)


def export(model, to="onnx", out=None, **options):
    """See :func:`cifarbench.export.export` (imported on first use to keep start-up light)."""
    from .export import export as _export

    return _export(model, to, out, **options)


__all__ = ["UserError", "occlusion_map", "open_runtime", "resolve_source", "export", "create_model", "list_models", "load_model", "__version__"]
