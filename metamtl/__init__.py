"""metamtl: meta-learning and multi-task learning for PyTorch."""
__version__ = "0.1.0"

from .errors import MetamtlError  # noqa: E402
from .learner import EvalResult, MetaLearner  # noqa: E402

__all__ = ["MetaLearner", "EvalResult", "MetamtlError", "__version__"]
