"""The ground floor: what every other package may use, importing none of them (the error type, CPU cores,
files written atomically, signals, metrics, torchrun, the background writer, the W&B boundary)."""
import os


class UserError(Exception):
    """Bad input the user can fix: train.py prints it as one line, without a traceback."""


def cores() -> int:
    """CPU cores this process may run on (a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
