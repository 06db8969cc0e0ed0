"""What train.py is built from: configuration (config.py), checkpoints (checkpoints.py), the model and device
setup (setup.py), the learning-rate schedule and data order (schedule.py), health checks (health.py), the run's
reports (report.py: metrics.jsonl, loss.svg; tracking.py: sample replies, adapter norms, TensorBoard / wandb) and
torchrun (distributed.py)."""
from .errors import TrainError

__all__ = ["TrainError"]
