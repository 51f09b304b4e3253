"""cifarbench: the four CIFAR-10 nets of a course report, compiled and analysed fast."""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .zoo import create_model, list_models, load_model  # noqa: E402

__all__ = ["UserError", "create_model", "list_models", "load_model", "__version__"]
