"""A run's plain-file record, readable without W&B: run ids, out_dir/metrics.jsonl (one line per logged row)
and out_dir/summary.json (the summary so far, with "_exit_code" once the run has finished).

Usage:
    record = RunRecord(out_dir); record.append({"epoch": 1, "val/acc": 0.9}); record.update_summary({...})
    history, summary = read_local(out_dir)      # the offline sweep runner and the journal, while a run is live
utils/tracking/ writes the record beside every W&B run; sweep.py and journal.py read it without importing wandb.
"""
import contextlib
import errno
import fcntl
import glob
import json
import math
import numbers
import os
import re
import secrets
import string
import time
from pathlib import Path

from utils.files import atomic_write_bytes

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"
DEFAULT_PROJECT = "sweepcls"  # the W&B project when --project and $WANDB_PROJECT are empty; sweep.yaml's too


def runs_dir() -> Path:
    """Where run folders go by default: $SWEEPCLS_RUNS_DIR (a sweep's trials: the sweep dir's runs/), else runs/."""
    return Path(os.environ.get("SWEEPCLS_RUNS_DIR") or "runs")


def run_folder(run_id: str, label: str) -> Path:
    """A new run's folder: runs_dir()/<label>-<id>, label being --run_name or the model as a file name
    (runs/resnet18-q65tju9m). A run whose id was given to it (WANDB_RUN_ID: a sweep's trial, which its sweep, its
    trial files and a requeue find by id) keeps the bare id."""
    label = re.sub(r"[^\w.-]+", "-", label).strip("-.")[:40]
    return runs_dir() / (f"{label}-{run_id}" if label and not os.environ.get("WANDB_RUN_ID") else run_id)


def find_run_folder(root: Path, run_id: str) -> Path | None:
    """The folder of run `run_id` under root, named either way (<id> or <label>-<id>); None if there is none."""
    found = [Path(root) / run_id, *sorted(Path(root).glob(f"*-{glob.escape(run_id)}"))]
    return next((f for f in found if f.is_dir()), None)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def claimed(out_dir: Path, hold: bool = True):
    """out_dir, created and held by this process for the block's length (a POSIX lock on out_dir/.lock, which the
    kernel drops when the process ends, however it ends, and which, unlike flock, the loader's forked workers do
    not inherit: a SIGKILLed run's lingering workers hold nothing): a second run started into the same folder while
    the first is alive is a UserError naming the first's pid, not two runs writing one folder; a folder that cannot
    be written is a UserError too. hold False: nothing is done (torchrun's other ranks)."""
    from utils import UserError
    out_dir = Path(out_dir)
    if not hold:
        yield out_dir
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} cannot be written ({e.strerror or e}); pass a folder you can write "
                        f"to") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"--out_dir {out_dir} is in use by a run still going (process {holder}); wait for it, "
                            f"or pass another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield out_dir
    finally:
        os.close(fd)  # the lock goes with it


def random_id() -> str:
    """8 characters of [a-z0-9], the shape of W&B's run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def new_run_id() -> str:
    """The agent's run id under `wandb agent` (it sets WANDB_RUN_ID), else a fresh one."""
    return os.environ.get("WANDB_RUN_ID") or random_id()


SKIP = object()  # what plain() gives for media and tables: left out of the plain files


def plain(value):
    """JSON-able scalars, NaN and inf as text so every line stays valid JSON; SKIP for media and tables."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return items if SKIP not in items else SKIP
    if isinstance(value, dict):
        items = {str(k): plain(v) for k, v in value.items()}
        return items if SKIP not in items.values() else SKIP
    if isinstance(value, numbers.Number):
        value = float(value) if not isinstance(value, numbers.Integral) else int(value)
        return value if not isinstance(value, float) or math.isfinite(value) else str(value)
    return SKIP


ATTEMPT_KEYS = ("preempted", "stopped", "error", "wandb_unfinished")  # how one attempt of a run ended: a resumed
# attempt starts without them (W&B copies a resumed run's summary back from the server)


class RunRecord:
    """out_dir's metrics.jsonl and summary.json for one run. resume: the saved {"history_rows", "summary"} of an
    interrupted run; the rows logged after its saved state are dropped (they are redone), and so is how the last
    attempt ended (ATTEMPT_KEYS)."""

    def __init__(self, out_dir: Path, resume: dict | None = None):
        self.dir = Path(out_dir)
        rows = (self.dir / METRICS_FILE).read_text().splitlines()[:resume["history_rows"]] if resume else []
        (self.dir / METRICS_FILE).write_text("".join(r + "\n" for r in rows))
        self.rows = len(rows)
        self.summary = {k: v for k, v in resume["summary"].items() if k not in ATTEMPT_KEYS} if resume else {}
        self.write_summary()  # no stale "_exit_code" from an earlier attempt while this one runs

    def append(self, metrics: dict) -> None:
        row = {k: plain(v) for k, v in metrics.items()} | {"_time": round(time.time(), 3)}  # wall clock, Unix seconds
        with open(self.dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({k: v for k, v in row.items() if v is not SKIP}) + "\n")
        self.rows += 1

    def update_summary(self, values: dict) -> None:
        self.summary.update({k: v for k, v in ((k, plain(v)) for k, v in values.items()) if v is not SKIP})
        self.write_summary()

    def write_summary(self) -> None:  # a reader sees the old summary or the new one
        atomic_write_bytes(self.dir / SUMMARY_FILE, json.dumps(self.summary, indent=1).encode())

    def history(self, prefix: str = "") -> list[dict]:
        """The rows logged so far (resumed attempts included), keys under `prefix` with the prefix taken off."""
        rows = [r for r in read_local(self.dir)[0] if any(k.startswith(prefix) for k in r)]
        def strip(key: str) -> str:
            return key if key == "epoch" else key[len(prefix):]
        return [{strip(k): v for k, v in r.items() if k.startswith(prefix) or k == "epoch"} for r in rows]


def read_local(out_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, summary) of a run from its plain files, live or finished; empty when absent."""
    out_dir = Path(out_dir)
    try:
        lines = (out_dir / METRICS_FILE).read_text().splitlines()
    except OSError:
        lines = []
    history = []
    for line in lines:
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}
    return history, summary
