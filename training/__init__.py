"""What train.py is built from: configuration (config.py), checkpoints (checkpoints.py), the model and device
setup (setup.py), the learning-rate schedule and data order (schedule.py), and the run's reports (report.py)."""
from .errors import TrainError

__all__ = ["TrainError"]
