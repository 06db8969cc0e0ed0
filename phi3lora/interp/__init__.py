"""Looking inside the model: capture attention and the residual stream (capture.py), the logit lens, activation
patching, and the pictures of them (viz.py, needs the [viz] extra)."""
from .internals import capture

__all__ = ["capture"]
