"""The one error type of the training package."""


class TrainError(Exception):
    """A problem the user can fix; train.py's main() prints it as "error: ..." and exits with status 2."""
