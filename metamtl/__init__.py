"""metamtl: meta-learning and multi-task learning for PyTorch."""
__version__ = "0.1.0"

from .errors import MetamtlError  # noqa: E402
from .learner import EvalResult, MetaLearner  # noqa: E402
from . import multitask  # noqa: E402,F401  (registers the "multidataset" model and "multitask" algorithm)

__all__ = ["MetaLearner", "EvalResult", "MetamtlError", "__version__"]
