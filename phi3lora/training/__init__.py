"""What train.py is built from: configuration (config.py), checkpoints (checkpoints.py), the model and device
setup (setup.py), the learning-rate schedule (lr_schedule.py), the data order (data_order.py), health checks
(health.py), the run's own records (metrics.py: the progress line, metrics.jsonl, loss.svg), experiment tracking
(tracking.py: sample replies, adapter norms, TensorBoard / wandb) and torchrun (distributed.py)."""
from .errors import TrainError

__all__ = ["TrainError"]
