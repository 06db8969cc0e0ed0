"""Looking inside the model: capture attention and the residual stream, the logit lens and activation patching
(internals.py), and the pictures of them (viz.py, needs the [viz] extra)."""
from .internals import capture

__all__ = ["capture"]
