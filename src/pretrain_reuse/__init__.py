"""pretrain-reuse: reuse the right pre-training data when fine-tuning, and explain what it hands over."""

__version__ = "0.1.0"

from .artifacts import load  # noqa: E402  (needs __version__ above)
from .errors import PretrainReuseError  # noqa: E402

__all__ = ["PretrainReuseError", "__version__", "load"]
