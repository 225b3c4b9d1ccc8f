"""Resumable training state: what an interrupted run needs to continue exactly where its last
completed epoch left it (model, optimizer, scheduler, AMP scaler, EMA, step count, checkpoint ranking,
RNG states, W&B step), written atomically after every epoch as out_dir/resume.pt.

The file holds tensors and plain Python values only, and is read with torch.load(weights_only=True):
a crafted pickle that would run code is refused, never executed.

Usage:
    path = find_resume(cfg.resume, out_dir)      # None: start fresh
    state = load_state(path); set_rng_state(state["rng"])
    save_state(out_dir / RESUME_FILE, {..., "rng": rng_state()})
"""
import io
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from utils import UserError
from utils.checkpoint import atomic_write_bytes

RESUME_FILE = "resume.pt"
FORMAT = "sweepcls-resume/1"
# keys that may change between an interrupted run and its resumption without changing what it computes
FREE_KEYS = {"resume", "out_dir", "workers", "wandb_mode", "project", "entity", "run_name", "table_rows", "device"}


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_state(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())  # a kill mid-write leaves the previous file whole


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: it holds more than tensors and plain values, so unpickling it "
                        f"could run code ({str(e).splitlines()[0][:200]}). Only load resume files you wrote") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"{path}: not a readable resume file ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a sweepcls resume file (format {FORMAT})")
    return state


def find_resume(resume: str, out_dir: Path) -> Path | None:
    """--resume auto: out_dir/resume.pt if a run there was interrupted, else None (a fresh start);
    --resume PATH: that file, or PATH/resume.pt."""
    if not resume:
        return None
    if resume == "auto":
        path = Path(out_dir) / RESUME_FILE
        return path if path.is_file() else None
    path = Path(resume)
    path = path / RESUME_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--resume {resume}: no {RESUME_FILE} there; pass a run dir that was interrupted, or auto")
    return path


def check_same_run(saved: dict, current: dict, path: Path) -> None:
    changed = sorted(k for k in saved if k not in FREE_KEYS and saved.get(k) != current.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in changed[:8])
        raise UserError(f"--resume {path}: the run was started with other values ({diffs}); resume with the same "
                        f"config, or start a new run")
