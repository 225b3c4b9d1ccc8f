"""Resumable training state: what an interrupted run needs to continue exactly where its last
completed epoch left it (model, optimizer, scheduler, AMP scaler, EMA, step count, checkpoint ranking,
RNG states, W&B step), written atomically after every epoch as out_dir/resume.pt.

The file holds tensors and plain Python values only, and is read with torch.load(weights_only=True):
a crafted pickle that would run code is refused, never executed.

Usage:
    state, out_dir = resume_from(cfg, out_dir)             # state None: start fresh (a finished run's folder: refused)
    best_probs = restore_training_state(state, stepper, keeper)
    save_state(out_dir / RESUME_FILE, {"next_epoch": ..., **training_state(stepper, keeper, best_probs)})
"""
import io
import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from utils import UserError, distributed
from utils.files import atomic_write_bytes
from utils.runs import METRICS_FILE, SUMMARY_FILE, read_local
from workflows.config import AUTO_KEYS, BOOKKEEPING_KEYS  # may change between an interrupted run and its resumption

RESUME_FILE = "resume.pt"
FORMAT = "sweepcls-resume/1"


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_state(path: Path, state: dict, writer=None) -> None:
    """With a writer (utils.background.BackgroundWriter): tensors are copied now, the file is written on its thread."""
    if writer is not None:
        snapshot = _copied(state)
        writer.submit(lambda: save_state(path, snapshot))
        return
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())  # a kill mid-write leaves the previous file whole


def _copied(value):
    """Tensors (on any device) as CPU copies, containers rebuilt; plain values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value.copy() if isinstance(value, np.ndarray) else value


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


FINAL_MONITOR = "epoch"  # the monitor of --final_fit's fit (train.py holdout): its last epoch is its best


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
    free = BOOKKEEPING_KEYS | ({"fold"} if saved.get("cv") else set())  # a cross-validated run saves the fold it was in
    if saved.get("monitor") == FINAL_MONITOR:  # stopped in --final_fit's fit, which keeps its last epoch
        free |= {"monitor", "monitor_mode", "patience"}
    auto = {k for k, v in current.items() if v in ("auto", 0) and k in AUTO_KEYS}  # decided again, the same way
    auto |= {"pretrained_path"} if current.get("pretrained") == "auto" else set()
    free |= {"test_bn"}  # used once, after training: a run saved before --test_bn auto resumes under it
    validated_alike = {"none", "auto"}  # --tta auto validates without views, as none does
    changed = sorted(k for k in saved if k not in free | auto and saved.get(k) != current.get(k)
                     and not (k == "tta" and {saved.get(k), current.get(k)} <= validated_alike))
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in changed[:8])
        raise UserError(f"--resume {path}: the run was started with other values ({diffs}); resume with the same "
                        f"config, or start a new run")


def training_state(stepper, keeper, best_probs) -> dict:
    """optim.stepper.Stepper (model, optimizer, scheduler, scaler, EMA, step count) and CheckpointKeeper
    (top-k ranking, best so far), the best epoch's validation probabilities, and every RNG."""
    return dict(model=stepper.model.state_dict(), ema=stepper.ema.state_dict() if stepper.ema is not None else None,
                optimizer=stepper.optimizer.state_dict(), scheduler=stepper.scheduler.state_dict(),
                scaler=stepper.scaler.state_dict(), steps=stepper.steps, bad_steps=stepper.bad_steps,
                top=[list(t) for t in keeper.top], best_score=keeper.best_score, best_epoch=keeper.best_epoch,
                best_probs=None if best_probs is None else torch.from_numpy(best_probs),
                rng=rng_state())


def save_fit_state(path: Path, cfg, run, s, next_epoch: int, best_probs: np.ndarray | None, progress=None) -> None:
    """train.py's fit, as `path` on the checkpoint writer's thread (rank 0 only): after an epoch, or at a stop inside
    epoch `next_epoch` with its progress (optim.stepper.EpochProgress: the batches trained, their loss, the lr the
    epoch started at). s: workflows.training.FitSetup; run: utils.tracking.Run (its W&B step, its history rows)."""
    if distributed.is_main():
        save_state(path, {"run_id": run.id, "config": cfg.to_dict(), **run.position(), "next_epoch": next_epoch,
                          "in_epoch": progress.state() if progress is not None else None,
                          "model_logged_epoch": s.model_log.logged_epoch,
                          **training_state(s.stepper, s.keeper, best_probs)}, s.keeper.writer)


def describe_resume(cfg, start_epoch: int, progress, keeper) -> str:
    """The console line of a resumed fit: where it continues (progress: a stop inside that epoch), the best so far."""
    if start_epoch > cfg.epochs:
        return "resumed after the last epoch: the test set's prediction and the submission are left"
    where = f", after its first {progress.batches} batches" if progress else ""
    best = f", best {cfg.monitor} so far {keeper.best_score:.4f}" if keeper.best_epoch else ""
    return f"resumed at epoch {start_epoch} of {cfg.epochs}{where}{best}"


def restore_training_state(state: dict, stepper, keeper) -> np.ndarray | None:
    """The inverse of training_state; returns the best epoch's validation probabilities."""
    stepper.model.load_state_dict(state["model"])
    stepper.optimizer.load_state_dict(state["optimizer"])
    stepper.scheduler.load_state_dict(state["scheduler"])
    stepper.scaler.load_state_dict(state["scaler"])
    if stepper.ema is not None:
        stepper.ema.load_state_dict(state["ema"])
    stepper.steps, stepper.bad_steps = state["steps"], state.get("bad_steps", 0)
    keeper.top = [tuple(t) for t in state["top"]]
    keeper.best_score, keeper.best_epoch = state["best_score"], state["best_epoch"]
    set_rng_state(state["rng"])
    return None if state["best_probs"] is None else state["best_probs"].numpy()  # None: stopped before a best


def results_in(out_dir: Path, monitor: str) -> str:
    """What a fresh start in out_dir would overwrite, in words; '' when nothing: a finished run (summary.json's
    _exit_code 0), or the checkpoints of an epoch that ended (best, epoch-NNN; in out_dir or its fold*/). A lone
    last.safetensors (a stop inside the first epoch) or the summary of a run stopped before training is no result."""
    folders = [out_dir, *sorted(d for d in Path(out_dir).glob("fold*") if d.is_dir())]
    found = [str(p.relative_to(out_dir)) for d in folders for pattern in ("best.safetensors", "epoch-*.safetensors")
             for p in sorted(d.glob(pattern))]
    _, summary = read_local(out_dir)
    if summary.get("_exit_code") == 0:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime((Path(out_dir) / SUMMARY_FILE).stat().st_mtime))
        best, epoch = summary.get(monitor), summary.get("best_epoch")
        return (f"a run that finished at {when}" + (f", best {monitor} {best:.4f}" if isinstance(best, float) else "")
                + (f" at epoch {epoch}" if isinstance(best, float) and isinstance(epoch, int) else ""))
    if found:
        code = summary.get("_exit_code")
        return (f"a run's checkpoints ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
                + (f", ended with exit code {code}" if code is not None else ""))
    return ""


def move_aside(out_dir: Path) -> Path | None:
    """out_dir, when it holds anything, renamed to <out_dir>.before-<YYYYmmdd-HHMMSS> (-2, -3, ... when taken);
    the new name, or None when there was nothing to move. Nothing is deleted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    if Path.cwd().resolve().is_relative_to(out_dir.resolve()):
        raise UserError(f"--restart would move {out_dir}, the folder you are in; pass an --out_dir of its own")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out_dir.parent / f"{out_dir.name}.before-{stamp}", 2
    while aside.exists():
        aside, n = out_dir.parent / f"{out_dir.name}.before-{stamp}-{n}", n + 1
    os.rename(out_dir, aside)  # in the same folder: one rename, nothing copied
    return aside


def claim_out_dir(cfg, out_dir: Path) -> None:
    """Before anything is written there: --restart moves an earlier run in out_dir aside; else a folder that holds
    a run's results (results_in) and no resume.pt this run continues from is refused, saying what to do."""
    if cfg.restart:
        if aside := move_aside(out_dir):
            print(f"--restart: the earlier run in {out_dir} is now in {aside}; starting over in {out_dir}")
        return
    path = find_resume(cfg.resume, out_dir)
    if path is not None:
        out_dir = Path(cfg.out_dir) if cfg.out_dir else path.parent  # where the resumed run writes (resume_from)
        if out_dir.resolve() == path.parent.resolve():
            return  # it continues the run in its own folder
    if found := results_in(out_dir, cfg.monitor):
        continue_it = " --resume auto to continue it," if (Path(out_dir) / RESUME_FILE).is_file() else ""
        raise UserError(f"{out_dir} holds {found}; a fresh start would overwrite it. Pass{continue_it} a new "
                        f"--out_dir, or --restart True to move it aside (to {out_dir}.before-<time>) and start over")


def resume_from(cfg, out_dir: Path) -> tuple[dict | None, Path]:
    """The saved state a run continues from (None: a fresh start) and the run's folder, claimed first
    (claim_out_dir: rank 0 looks and moves, every rank gets its answer)."""
    problem = None
    if distributed.is_main():
        try:
            claim_out_dir(cfg, out_dir)
        except UserError as e:
            problem = str(e)
    if problem := distributed.broadcast(problem):
        raise UserError(problem)
    path = find_resume(cfg.resume, out_dir)
    if path is None:
        return None, out_dir
    state = load_state(path)
    check_same_run(state["config"], cfg.to_dict(), path)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else path.parent
    rows = path.parent / METRICS_FILE
    if distributed.is_main() and rows.is_file() and not (out_dir / METRICS_FILE).exists():  # continued elsewhere
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rows, out_dir / METRICS_FILE)  # the epochs before the state, as their rows were logged
    return state, out_dir


def save_arrays(path: Path, values: dict) -> None:
    """A few arrays and numbers as .npz, written atomically; None becomes an empty array."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.empty(0) if v is None else np.asarray(v) for k, v in values.items()})
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path) -> dict:
    """The inverse of save_arrays (allow_pickle=False: plain arrays only)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: None if f[k].size == 0 and f[k].ndim == 1 else f[k].item() if f[k].ndim == 0 else f[k]
                for k in f.files}


def stopped_note(out_dir: Path, cfg) -> str:
    """What a stopped run says it saved and how to continue (the start of its last line). A run in a folder of its
    own id's choosing (no --out_dir, no id given by a sweep) is found again only through --resume."""
    fixed = bool(cfg.out_dir or os.environ.get("WANDB_RUN_ID"))  # the same command comes back to out_dir
    again = "the same command" + (" without --restart" if cfg.restart else "")
    if (out_dir / RESUME_FILE).is_file():
        how = again if fixed else f"{again} with --resume {out_dir}"
        return f"saved where it stopped (resume.pt, last.safetensors in {out_dir}): {how} continues it; "
    return f"nothing trained yet; {again} starts it again" + (f" in {out_dir}; " if fixed else "; ")
