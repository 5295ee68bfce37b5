"""pretrain-reuse: reuse pre-training data for fine-tuning, and explain what pre-training hands over."""
__version__ = "0.1.0"
