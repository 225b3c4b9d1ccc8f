"""Shared pieces: config, tracking (the only W&B import), checkpoints, metrics."""


class UserError(Exception):
    """Bad input the user can fix: train.py prints it as one line, without a traceback."""
