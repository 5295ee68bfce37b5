"""pretrain-reuse: reuse the right pre-training data when fine-tuning, and explain what it hands over."""

__version__ = "0.1.0"

from .artifacts import load
from .errors import PretrainReuseError

__all__ = ["PretrainReuseError", "__version__", "load"]
