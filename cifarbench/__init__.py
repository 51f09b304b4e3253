"""cifarbench: the four CIFAR-10 nets of a course report, compiled and analysed fast."""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .zoo import create_model, list_models, load_model  # noqa: E402


def occlusion_map(model, image, k, **kwargs):
    """See :func:`cifarbench.analysis.occlusion.occlusion_map` (imported on first use to keep start-up light)."""
    from .analysis.occlusion import occlusion_map as _occlusion_map

    return _occlusion_map(model, image, k, **kwargs)


__all__ = ["UserError", "occlusion_map", "create_model", "list_models", "load_model", "__version__"]
