"""The ground floor: what every other package may use, importing none of them (the error type, CPU cores,
files written atomically, signals, metrics, torchrun, the background writer, the W&B boundary)."""
import os
import sys


class UserError(Exception):
    """Bad input the user can fix: every command ends on it with report_error (one line, no traceback)."""


def report_error(error: Exception) -> int:
    """How every command ends on bad input: one `error: ...` line on stderr, no traceback; returns the exit code 1
    (argparse's own usage errors exit 2; a stop exits 128 + the signal: utils/stop.py)."""
    print(f"error: {error}", file=sys.stderr)
    return 1


def cores() -> int:
    """CPU cores this process may run on (a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
