"""Train one image classifier; every run is a W&B run (online with an API key, else offline).

Usage:
    python train.py                                   # the digits demo: clean train set, noisy test set
    python train.py --data PATH --model convnext_tiny --img_size 224 --epochs 30
    python train.py --help                            # every key with its default and meaning
    train.main(Config(data="PATH", epochs=3))         # from a notebook
Under `wandb agent`, the same flags arrive as --key=value and values the sweep locks win.
Reads top-down: main -> train (data, decisions, lineage) -> fit (one split's epochs) -> the epoch's pieces.
"""
import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets import load_data, screen_images
from models.checkpoint import read_meta
from optim import is_per_epoch
from optim.stepper import EpochProgress, train_one_epoch
from utils import UserError, distributed, report_error, tracking
from utils.device import pick_device
from utils.metrics import classification_metrics
from utils.runs import claimed, new_run_id, run_folder
from utils.stop import Stopped, StopSignal, ignore_later_stops
from workflows import check, lineage, prepare, resume, training
from workflows.config import ADDED_CONFIG_KEYS, Config
from workflows.flags import parse_config
from workflows.label_errors import analyse_oof, apply_label_fixes
from workflows.report import submit_report, val_predictions, where_and_next, write_test_outputs
from workflows.training import FitInputs, FitSetup, build_fit, describe_fit, epoch_metrics, evaluate, predict_test


def main(cfg: Config | list[str] | None = None) -> int:
    """A Config runs as it is; a list of flags (default: the command line) is parsed first. Returns the exit code."""
    if not isinstance(cfg, Config) and "--check" in (cfg if cfg is not None else sys.argv[1:]):
        return check.main(parse_config(cfg))  # the resolved plan, printed; nothing written, no W&B run
    with StopSignal() as stop:  # from the start: a stop during set-up still finishes the W&B run
        cfg = cfg if isinstance(cfg, Config) else parse_config(cfg)
        try:
            rank, world = distributed.setup(pick_device(cfg.device))  # torchrun: one process per GPU; else (0, 1)
            stop.phase_checks = world == 1  # torchrun: stops at optimizer steps only, where every rank agrees
        except UserError as e:
            return report_error(e) if distributed.local_rank() == 0 else 1
        try:
            if rank > 0:
                sys.stdout = open(os.devnull, "w")  # one console log, rank 0's; errors still reach stderr
            return run_and_finish(cfg, stop)
        finally:
            distributed.teardown()


def run_and_finish(cfg: Config, stop: StopSignal) -> int:
    """One run, as a W&B run: exit code 0, 1 (a UserError, one line on stderr) or 128 + signal."""
    try:
        cfg.validate()  # a Config built in a notebook is checked as the flags are
        prepare.check_before_start(cfg)  # a typo leaves no run folder, no W&B run
        mode = tracking.resolve_mode(cfg.wandb_mode)  # e.g. under `wandb agent` without a key: a UserError
        run_id = distributed.broadcast(new_run_id())
        out_dir = Path(cfg.out_dir or run_folder(run_id, cfg.run_name or prepare.model_name(cfg)))  # runs/resnet18-<id>
        state, out_dir = resume.resume_from(cfg, out_dir)
        with claimed(out_dir, hold=distributed.is_main()):  # no second run writes it at once; torchrun: rank 0
            options = tracking.RunOptions(project=cfg.project, entity=cfg.entity, name=cfg.run_name, notes=cfg.notes,
                                          tags=cfg.tags, console=cfg.wandb_console, record=distributed.is_main())
            run = tracking.init(cfg.to_dict(), state["run_id"] if state else run_id, out_dir, mode, options,
                                resume=state, stop_fn=stop.request)  # W&B's stop (UI, sweep): a stop like a signal's

            def work():
                # a sweep's values win
                locked = Config.from_dict(distributed.broadcast(run.config(exclude=ADDED_CONFIG_KEYS)))
                train(locked, run, out_dir, stop, state)  # a stop after the last epoch: done anyway
                if distributed.is_main():
                    (out_dir / resume.RESUME_FILE).unlink(missing_ok=True)  # finished: nothing to resume
            code = run.run_to_end(work, stopped_note=lambda: resume.stopped_note(out_dir, cfg))
            if not code and distributed.is_main():  # the last lines, after W&B's footer: where, and what next
                print(where_and_next(cfg, out_dir))
            return code
    except UserError as e:
        return report_error(e)


def train(cfg: Config, run, out_dir: Path, stop: StopSignal, state: dict | None = None) -> None:
    """Read the data, decide what is auto, record the lineage, train (all folds with --cv), write the submission."""
    source, artifact = prepare.data_source(cfg, run)
    data = load_data(source, cfg.image_col, cfg.label_col, cfg.group_col, cfg.skip_bad_images)
    given, cfg = cfg, prepare.resolve_auto(cfg, run, data)  # the lineage records what was asked: auto, not its answer
    source_rows = lineage.manifest(data)  # the paths, as read (screening returns decoded copies)
    if cfg.label_fixes:
        fixed, excluded = apply_label_fixes(data, cfg.label_fixes)
        print(f"--label_fixes {cfg.label_fixes}: {fixed} label(s) changed, {excluded} image(s) excluded")
        run.set_summary({"label_fixes/changed": fixed, "label_fixes/excluded": excluded})
    rows = lineage.manifest(data) if cfg.label_fixes else source_rows
    stored = prepare.stored_images(data)  # the images as stored, before the decode cache resizes them: what is measured
    start = time.perf_counter()
    data, skipped = screen_images(data, cfg.skip_bad_images, cfg.cache, cfg.img_size, cfg.cache_dir or None,
                                  cfg.cache_max_gb)
    print(f"images {'cached' if cfg.cache != 'none' else 'checked'} in {time.perf_counter() - start:.1f}s"
          + (f" ({data.items.path})" if getattr(data.items, "path", None) else ""))
    if skipped:
        print(f"skipped {len(skipped)} unreadable training image(s): {skipped[:20]}")
        run.set_summary({"skipped_images": skipped})
    lineage_meta = None
    if distributed.is_main():
        kept = set(data.ids)  # the images that train: skipped ones left out
        lineage_meta = lineage.record(given, run, out_dir, [r for r in rows if r[0] != "train" or r[1] in kept],
                                      data.classes, source_rows, artifact, resumed=state is not None)
    shift = prepare.measure_test_shift(cfg, run, data, stored)
    pseudo = prepare.load_pseudo_labels(cfg, run, data, lineage_meta)
    inputs = FitInputs(data, lineage_meta, shift, pseudo)
    if cfg.cv:
        summary, test_probs = cross_validate(cfg, run, out_dir, inputs, stop, state)
    else:
        summary, test_probs = holdout(cfg, run, out_dir, inputs, stop, state)
    if distributed.is_main():
        finish_summary(cfg, run, out_dir, data, summary, test_probs)


def finish_summary(cfg: Config, run, out_dir: Path, data, summary: dict, test_probs: np.ndarray | None) -> None:
    """submission.csv (also an artifact), the test scores where the test labels are known, the summary line."""
    summary["out_dir"] = str(out_dir)
    if test_probs is not None:
        write_test_outputs(out_dir, data, test_probs, f"{out_dir.name} (run {run.id}, {cfg.model})")
        run.log_artifact(out_dir / "submission.csv", f"submission-{run.id}", "submission",
                         {cfg.monitor: summary[cfg.monitor]})
        if data.test_labels is not None:
            tm = classification_metrics(data.test_labels, test_probs)
            summary |= {f"test/{k}": tm[k] for k in ("acc", "f1_macro", "acsa", "auc_macro")}
    run.set_summary(summary)
    print(f"best {cfg.monitor} {summary[cfg.monitor]:.4f}"
          + (f" at epoch {summary['best_epoch']}" if "best_epoch" in summary else " (mean over folds)")
          + (f" | test/f1_macro {summary['test/f1_macro']:.4f}" if "test/f1_macro" in summary else "")
          + (f" (holdout model: {summary['holdout/test/f1_macro']:.4f})" if "holdout/test/f1_macro" in summary else "")
          + (" | final fit on every labelled image predicted it" if "final/best_epoch" in summary else "")
          + (f" | wrote {out_dir / 'submission.csv'}" if test_probs is not None else ""))


# ----------------------------------------------------------------------------- one split
@dataclass
class FitResult:
    val_idx: np.ndarray
    val_probs: np.ndarray  # at the best epoch
    best_score: float
    best_epoch: int
    best_path: Path
    test_probs: np.ndarray | None  # the best checkpoint's, rebuilt from the file alone
SAVED = ("val_idx", "val_probs", "best_score", "best_epoch", "test_probs")  # result.npz: a fit done before a resume


def cross_validate(cfg: Config, run, out_dir: Path, inputs: FitInputs, stop: StopSignal,
                   state: dict | None = None) -> tuple[dict, np.ndarray | None]:
    """All folds in one run: the monitored metric is their mean (std beside it); out-of-fold probabilities of every
    training image go to oof.csv and a W&B artifact; the test set gets the folds' average. Resuming, folds done
    before `state`'s are read back from fold<k>/result.npz."""
    data = inputs.data
    oof, folds, results = np.full((len(data.labels), len(data.classes)), np.nan), np.zeros(len(data.labels), int), []
    start = state["config"]["fold"] if state else 0
    for k in range(cfg.folds):
        fold_dir = out_dir / f"fold{k}"
        if k < start:
            r = FitResult(**resume.load_arrays(fold_dir / "result.npz"), best_path=fold_dir / "best.safetensors")
        else:
            r = fit(dataclasses.replace(cfg, fold=k), run, fold_dir, inputs, stop, prefix=f"fold{k}/",
                    state=state if k == start else None, resume_path=out_dir / resume.RESUME_FILE)
            if distributed.is_main():
                resume.save_arrays(fold_dir / "result.npz", {f: getattr(r, f) for f in SAVED})
        oof[r.val_idx], folds[r.val_idx] = r.val_probs, k
        results.append(r)
        scores = [r.best_score for r in results]
        if k >= start:  # a resumed run logged the folds before it already
            run.log({"fold": k + 1, f"cv/{cfg.monitor}": float(np.mean(scores))})
        run.set_summary({cfg.monitor: float(np.mean(scores)), f"{cfg.monitor}_std": float(np.std(scores)),
                         "cv/folds_done": k + 1})
    if not distributed.is_main():
        return {}, None
    summary = analyse_oof(cfg, run, out_dir, data, oof, folds, scores)
    test = [r.test_probs for r in results]
    return summary, None if test[0] is None else np.mean(test, axis=0)


def holdout(cfg: Config, run, out_dir: Path, inputs: FitInputs, stop: StopSignal,
            state: dict | None = None) -> tuple[dict, np.ndarray | None]:
    """One holdout fit; its best epoch is the run's monitor. --final_fit: then one more fit, on every labelled image
    for the same epochs with the holdout's test-time steps, in final/; its last epoch predicts the test set."""
    in_final = state is not None and state["config"]["monitor"] == resume.FINAL_MONITOR  # stopped in the final fit
    r = (FitResult(**resume.load_arrays(out_dir / "result.npz"), best_path=out_dir / "best.safetensors") if in_final
         else fit(cfg, run, out_dir, inputs, stop, state=state))
    summary = {cfg.monitor: r.best_score, "best_epoch": r.best_epoch}
    if cfg.final_fit == "false" or (cfg.final_fit == "auto" and not inputs.data.test_items):
        return summary, r.test_probs
    if distributed.is_main() and not in_final:
        resume.save_arrays(out_dir / "result.npz", {f: getattr(r, f) for f in SAVED})
    decided = distributed.broadcast(read_meta(r.best_path).get("test_time") if distributed.is_main() else None)
    final_cfg = dataclasses.replace(cfg, monitor=resume.FINAL_MONITOR, monitor_mode="max", patience=0)
    final_inputs = prepare.final_fit_inputs(cfg, run, inputs, r.test_probs, decided)  # --final_pseudo: labels too
    final = fit(final_cfg, run, out_dir / "final", final_inputs, stop,
                prefix="final/", state=state if in_final else None, resume_path=out_dir / resume.RESUME_FILE)
    if r.test_probs is not None and inputs.data.test_labels is not None:  # what the final fit changed, where known
        summary["holdout/test/f1_macro"] = classification_metrics(inputs.data.test_labels, r.test_probs)["f1_macro"]
    return summary | {"final/best_epoch": final.best_epoch}, final.test_probs


def fit(cfg: Config, run, out_dir: Path, inputs: FitInputs, stop: StopSignal, prefix: str = "",
        state: dict | None = None, resume_path: Path | None = None) -> FitResult:
    """Train on fold cfg.fold (or the holdout split) and predict the test set with the best checkpoint.
    Metrics, tables and artifacts are logged under `prefix` (fold<k>/ in a cross-validated run).
    After each epoch, and at a stop inside one, resume_path (default out_dir/resume.pt) holds the whole training state;
    `state` (that file, loaded) continues from it, bit-identical on the CPU to a run that was never interrupted."""
    data = inputs.data
    s = build_fit(cfg, run.id, out_dir, inputs, prefix, online=run.mode == "online")
    print(describe_fit(cfg, s, data, prefix, out_dir, inputs))
    resume_path = resume_path or out_dir / resume.RESUME_FILE
    try:
        start_epoch, best_probs, progress = 1, None, None
        if state is not None:
            best_probs, start_epoch = resume.restore_training_state(state, s.stepper, s.keeper), state["next_epoch"]
            progress = EpochProgress(**state["in_epoch"]) if state.get("in_epoch") else None  # stopped inside it
            s.model_log.resume(run, s, state.get("model_logged_epoch"))
            print(resume.describe_resume(cfg, start_epoch, progress, s.keeper))
        for epoch in range(start_epoch, cfg.epochs + 1):
            start = time.perf_counter()
            progress = progress or EpochProgress(lr=s.stepper.optimizer.param_groups[0]["lr"])
            try:
                train_loss = train_epoch(cfg, run, s, epoch, prefix, stop, progress)
                probs, clean_probs = evaluate(s, cfg.tta)
            except Stopped as e:  # saved where it stands: --resume continues inside this epoch
                s.keeper.save_last(s.eval_model, {**s.meta, "epoch": epoch - 1, "stopped_in_epoch": epoch})
                e.phase = f"{e.phase} in {prefix}epoch {epoch}"  # summary `stopped` and the last line say so
                resume.save_fit_state(resume_path, cfg, run, s, epoch, best_probs, progress)
                raise
            scores, m = epoch_metrics(data.labels[s.val_idx], data.classes, probs, clean_probs)
            metrics = {"epoch": epoch, "lr": progress.lr, "train/loss": train_loss, **scores,
                       "train/epoch_seconds": time.perf_counter() - start}
            progress = None
            if is_per_epoch(s.stepper.scheduler):
                s.stepper.scheduler.step(metrics[cfg.monitor])
            meta = {**s.meta, "epoch": epoch, "metrics": {k: metrics[k] for k in s.scalar_keys}}
            if s.keeper.update(s.eval_model, meta, epoch, metrics[cfg.monitor]):
                best_probs = probs
            early_stop = log_epoch(cfg, run, data, s, prefix, metrics, m, probs)
            s.model_log.after_epoch(run, s, epoch)
            resume.save_fit_state(resume_path, cfg, run, s, cfg.epochs + 1 if early_stop else epoch + 1, best_probs)
            if early_stop:
                break
        test_probs = predict_test(cfg, run, data, s, prefix) if data.test_items and distributed.is_main() else None
        s.model_log.log_pending(run, s)  # after predict_test: the test-time decision it records is in the file
        if best_probs is not None:
            submit_report(cfg, run, prefix, data, s, best_probs, test_probs)  # every epoch's curves, the test set
    except BaseException:  # an error, a NaN stop, a signal: the newest best reaches W&B before the run finishes
        with contextlib.suppress(Exception):
            s.model_log.log_pending(run, s)
        raise
    finally:
        s.keeper.writer.close()  # every checkpoint and resume.pt written (a write error is raised here)
    return FitResult(s.val_idx, best_probs, s.keeper.best_score, s.keeper.best_epoch, s.keeper.best_path, test_probs)


def train_epoch(cfg: Config, run, s: FitSetup, epoch: int, prefix: str, stop: StopSignal, progress) -> float:
    """One epoch's training loss from where `progress` (EpochProgress) stands (a resumed epoch: after its saved
    batches); a W&B row every --log_every steps. A stop raises Stopped between optimizer steps; a NaN loss errs."""
    s.sampler.set_epoch(epoch, skip=progress.batches * s.train_loader.batch_size)
    loss = train_one_epoch(s.stepper, s.train_loader, cfg.accum_steps, s.mixup, f"{prefix}epoch {epoch}/{cfg.epochs}",
                           stop, progress, training.step_rows(run, prefix, cfg.log_every))
    if not np.isfinite(loss):
        raise UserError(f"training loss is {loss} at epoch {epoch}; lower --lr or check the data")
    return loss


def log_epoch(cfg: Config, run, data, s: FitSetup, prefix: str, metrics: dict, m: dict, probs: np.ndarray) -> bool:
    """The epoch's row, its tables and report at a new best, the summary, the console line; True: early stop."""
    epoch, best = metrics["epoch"], s.keeper.best_epoch == metrics["epoch"]
    early_stop = bool(cfg.patience and epoch - s.keeper.best_epoch >= cfg.patience and epoch < cfg.epochs)
    last = early_stop or epoch == cfg.epochs  # the best epoch's tables, held for short epochs, are logged by now
    if best:
        run.log_eval_tables(f"{prefix}val", val_predictions(data, s, probs), m, cfg.table_rows, hold=not last)
    elif last:
        run.log_pending_tables(f"{prefix}val")
    run.log({k if k == "epoch" else prefix + k: v for k, v in metrics.items()})
    if best:
        submit_report(cfg, run, prefix, data, s, probs)
    run.set_summary({prefix + cfg.monitor: s.keeper.best_score, prefix + "best_epoch": s.keeper.best_epoch})
    shown = ["train/loss", "val/loss", "val/acc", "val/f1_macro", "val/acsa", "val/auc_macro", "val_clean/f1_macro"]
    print(f"{prefix}epoch {epoch:>3}/{cfg.epochs} | "
          + " | ".join(f"{k.replace('auc_macro', 'auc')} {metrics[k]:.4f}" for k in shown if k in metrics)
          + f" | {metrics['train/epoch_seconds']:.1f}s{' | best' if best else ''}")
    if early_stop:
        print(f"early stop: no new best {cfg.monitor} for {cfg.patience} epochs")
        run.set_summary({prefix + "stopped_epoch": epoch})
    return early_stop


if __name__ == "__main__":
    code = main()
    if code > 128:  # stopped by a signal: one that follows (the agent's SIGINT after its SIGTERM) keeps this code
        ignore_later_stops()
    sys.exit(code)
