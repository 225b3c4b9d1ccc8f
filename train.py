"""Train one image classifier; every run is a W&B run (online with an API key, else offline).

Usage:
    python train.py                                   # the digits demo: clean train set, noisy test set
    python train.py --data PATH --model convnext_tiny --img_size 224 --epochs 30
    python train.py --help                            # every key with its default and meaning
Under `wandb agent`, the same flags arrive as --key=value and values the sweep locks win.
"""
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3

from datasets import ImageDataset, build_sampler, load_data, load_image, screen_images, split_indices, write_submission
from datasets.cache import JoinedImages
from datasets.files import take
from datasets.pseudo import read_pseudo_labels
from datasets.shift import any_on, describe_shift, measure_data, native_side, noisy_copies
from datasets.transforms import AUGS, eval_transform
from losses import build_loss, loss_kwargs, soft_target_losses
from models import (DEFAULT_MODEL, DEMO_MODEL, MIN_AUTO_SIZE, adapt_test_bn, build_model, check_input_size, find_pretrained,
                    normalization, pretrained_input_size)
from optim import SAM, build_optimizer, build_scheduler, is_per_epoch, optimizer_kwargs, scheduler_kwargs
from optim.stepper import Stepper, train_one_epoch
from utils import UserError, distributed, tracking
from workflows import lineage
from utils.background import BackgroundWriter
from models.checkpoint import CheckpointKeeper, load_model, read_meta
from workflows.config import ADDED_CONFIG_KEYS, Config, parse_config
from utils.runs import new_run_id
from workflows.label_errors import analyse_oof, apply_label_fixes
from workflows.report import write_report
from workflows.resume import (RESUME_FILE, load_arrays, restore_training_state, resume_from, save_arrays, save_state,
                          training_state)
from utils.device import amp_dtype_for, default_workers, make_loader, pick_device, seed_everything
from utils.metrics import classification_metrics, nll
from workflows.inference import predict_probs
from utils.stop import StopSignal, Stopped


# ----------------------------------------------------------------------------- one run
@dataclass
class FitResult:
    val_idx: np.ndarray
    val_probs: np.ndarray  # at the best epoch
    best_score: float
    best_epoch: int
    best_path: Path
    test_probs: np.ndarray | None  # the best checkpoint's, rebuilt from the file alone


def fit(cfg: Config, run, out_dir: Path, data, stop: StopSignal, prefix: str = "", state: dict | None = None,
        resume_path: Path | None = None, lineage_meta: dict | None = None, shift: dict | None = None,
        pseudo: tuple | None = None) -> FitResult:
    """Train on fold cfg.fold (or the holdout split) and predict the test set with the best checkpoint.
    Metrics, tables and artifacts are logged under `prefix` (fold<k>/ in a cross-validated run).
    After each epoch resume_path (default out_dir/resume.pt) holds the whole training state; `state`
    (that file, loaded) continues from it, bit-identical on the CPU to a run that was never interrupted.
    lineage_meta (utils/lineage.record: code state, data fingerprint, changed keys) goes in every checkpoint.
    shift (datasets/shift.measure_data): the test set's measured corruption, for --aug_preset auto and --val_noise.
    pseudo: (test rows, their labels) that train beside the training split (--pseudo_labels)."""
    seed_everything(cfg.seed)
    device = distributed.device_for(pick_device(cfg.device))
    amp_dtype = amp_dtype_for(device, cfg.amp)
    rank, world = distributed.rank(), distributed.world_size()
    classes = data.classes
    train_idx, val_idx = split_indices(data.labels, data.groups, cfg.val_fraction, cfg.folds, cfg.fold, cfg.seed)
    y_train, y_val = data.labels[train_idx], data.labels[val_idx]
    train_items = take(data.items, train_idx)
    if pseudo is not None:  # confident test images, in training only
        train_items = JoinedImages(train_items, take(data.test_items, pseudo[0]))
        y_train = np.concatenate([y_train, pseudo[1]])
    settings = shift["settings"] if shift else None
    noisy_val = cfg.val_noise == "auto" and any_on(settings)  # val/* noisy, val_clean/* clean
    scalar_keys = ["train/loss", "val/loss", "val/acc", "val/f1_macro", "val/acsa", "val/auc_macro"]
    scalar_keys += ["val_clean/loss", "val_clean/acc", "val_clean/f1_macro"] if noisy_val else []
    metric_keys = scalar_keys + [f"val/f1/{c}" for c in classes]
    if cfg.monitor not in metric_keys:
        raise UserError(f"--monitor {cfg.monitor!r} is not a logged metric; choose one of {metric_keys}")
    loss_fn = build_loss(cfg.loss, **loss_kwargs(cfg, np.bincount(y_train, minlength=len(classes)))).to(device)
    mixup = None
    if cfg.mixup or cfg.cutmix:
        if not loss_fn.soft_targets:
            raise UserError(f"--loss {cfg.loss} takes class indices only, but --mixup/--cutmix make soft targets; "
                            f"use one of {soft_target_losses()} or set --mixup 0 --cutmix 0")
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, label_smoothing=0.0,
                      num_classes=len(classes))

    model = build_model(cfg.model, len(classes), cfg.pretrained == "true", cfg.pretrained_path, cfg.drop_rate, cfg.drop_path_rate,
                        cfg.img_size)
    if cfg.sync_bn and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    check_input_size(model, cfg.model, cfg.img_size)
    mean, std = normalization(model)
    eval_tf = eval_transform(cfg.img_size, mean, std)
    workers = default_workers(cfg.workers, world)
    train_ds = ImageDataset(train_items, y_train, AUGS.build(
        cfg.aug_preset, cfg.img_size, cfg.aug_strength, mean, std, **({"settings": settings} if cfg.aug_preset == "auto" else {})))
    sampler = build_sampler(cfg.sampler, y_train, cfg.seed, rank, world)
    train_loader = make_loader(train_ds, cfg.batch_size // world, workers, device, sampler,
                               drop_last=len(train_ds) > cfg.batch_size)
    val_part = distributed.shard(len(val_idx))  # this rank's share; the metrics use every rank's predictions
    val_items = take(data.items, val_idx)
    val_images = noisy_copies(val_items, [data.ids[i] for i in val_idx], settings) if noisy_val else val_items
    val_loader = make_loader(ImageDataset(take(val_images, val_part), y_val[val_part], eval_tf), cfg.batch_size,
                             workers, device)
    clean_loader = make_loader(ImageDataset(take(val_items, val_part), y_val[val_part], eval_tf), cfg.batch_size,
                               workers, device) if noisy_val else None

    optimizer = build_optimizer(cfg.optimizer, model, **optimizer_kwargs(cfg))
    scheduler = build_scheduler(cfg.scheduler, optimizer, **scheduler_kwargs(cfg, math.ceil(len(train_loader) / cfg.accum_steps)))
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    stepper = Stepper(model, loss_fn, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
                      device, amp_dtype, SAM(optimizer, cfg.sam_rho, cfg.sam_adaptive) if cfg.sam else None, ema, cfg.clip_grad,
                      cfg.nan_patience, distributed.wrap(model, device))
    if cfg.compile:
        stepper.net = torch.compile(stepper.net)
    eval_model = ema.module if ema is not None else model  # what is evaluated and checkpointed
    keeper = CheckpointKeeper(out_dir, cfg.keep_top_k, cfg.maximize, write=distributed.is_main(),
                              writer=BackgroundWriter("checkpoint-writer"))  # files written while the next epoch trains
    model_name = f"model-{run.id}{f'-fold{cfg.fold}' if prefix else ''}"  # its W&B artifact
    meta_base = dict(format="sweepcls/1", model=cfg.model, classes=classes, targets=data.targets,
                     img_size=cfg.img_size, mean=mean, std=std, config=cfg.to_dict(), run_id=run.id, fold=cfg.fold,
                     lineage=lineage_meta, test_shift=shift)
    print(f"{cfg.model} on {device} | {len(classes)} classes | train {len(train_idx)}"
          f"{f' + {len(pseudo[0])} pseudo-labelled' if pseudo is not None else ''}, val {len(val_idx)}, "
          f"test {len(data.test_items or [])} | {cfg.loss}, {cfg.optimizer}{'+SAM' if cfg.sam else ''}, "
          f"{cfg.scheduler}, {cfg.sampler} sampler{', EMA' if ema else ''} | {workers} loader workers"
          f"{f' | {world} processes' if world > 1 else ''} | {prefix}out {out_dir}")

    try:
        start_epoch, best_probs = 1, None
        if state is not None:
            best_probs, start_epoch = restore_training_state(state, stepper, keeper), state["next_epoch"]
            print(f"resumed at epoch {start_epoch} of {cfg.epochs}, best {cfg.monitor} so far {keeper.best_score:.4f}")

        for epoch in range(start_epoch, cfg.epochs + 1):
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_loss = train_one_epoch(stepper, train_loader, cfg.accum_steps, mixup, f"{prefix}epoch {epoch}/{cfg.epochs}", stop)
            except Stopped as e:  # keep the weights as they are, then let main finish the run
                keeper.save_last(eval_model, {**meta_base, "epoch": epoch - 1, "stopped_in_epoch": epoch})
                log_best_model(run, keeper, model_name)
                run.set_summary({"stopped": f"{e} in {prefix}epoch {epoch}"})
                raise
            if not np.isfinite(train_loss):
                raise UserError(f"training loss is {train_loss} at epoch {epoch}; lower --lr or check the data")
            probs = distributed.gather_rows(predict_probs(eval_model, val_loader, device, amp_dtype, cfg.tta), val_part, len(val_idx))
            m = classification_metrics(y_val, probs)
            clean = {}
            if noisy_val:
                clean_probs = distributed.gather_rows(predict_probs(eval_model, clean_loader, device, amp_dtype, cfg.tta),
                                                      val_part, len(val_idx))
                cm = classification_metrics(y_val, clean_probs)
                clean = {"val_clean/loss": nll(clean_probs, y_val), "val_clean/acc": cm["acc"], "val_clean/f1_macro": cm["f1_macro"]}
            metrics = {
                "epoch": epoch, "lr": lr, "train/loss": train_loss,
                "val/loss": nll(probs, y_val),  # cross-entropy whatever --loss is, so runs with different losses compare
                "val/acc": m["acc"], "val/f1_macro": m["f1_macro"], "val/acsa": m["acsa"], "val/auc_macro": m["auc_macro"],
                **{f"val/f1/{c}": float(f) for c, f in zip(classes, m["f1"])}, **clean,
                "train/epoch_seconds": time.perf_counter() - start,
            }
            if is_per_epoch(scheduler):
                scheduler.step(metrics[cfg.monitor])
            meta = {**meta_base, "epoch": epoch, "metrics": {k: metrics[k] for k in scalar_keys}}
            if keeper.update(eval_model, meta, epoch, metrics[cfg.monitor]):
                best_probs = probs
                run.log_eval_tables(f"{prefix}val", [data.ids[i] for i in val_idx], lambda r: load_image(val_images[r]),
                                         y_val, probs, classes, m, cfg.table_rows)
            run.log({k if k == "epoch" else prefix + k: v for k, v in metrics.items()})
            if keeper.best_epoch == epoch:
                submit_report(cfg, run, out_dir, prefix, data, val_idx, probs, keeper, val_images)
            run.set_summary({prefix + cfg.monitor: keeper.best_score, prefix + "best_epoch": keeper.best_epoch})
            print(f"{prefix}epoch {epoch:>3}/{cfg.epochs} | train/loss {train_loss:.4f} | val/loss {metrics['val/loss']:.4f} | "
                  f"val/acc {m['acc']:.4f} | val/f1_macro {m['f1_macro']:.4f} | val/acsa {m['acsa']:.4f} | val/auc {m['auc_macro']:.4f} | "
                  + (f"val_clean/f1_macro {clean['val_clean/f1_macro']:.4f} | " if clean else "") +
                  f"{metrics['train/epoch_seconds']:.1f}s{' | best' if keeper.best_epoch == epoch else ''}")
            early_stop = bool(cfg.patience and epoch - keeper.best_epoch >= cfg.patience and epoch < cfg.epochs)
            if early_stop:
                print(f"early stop: no new best {cfg.monitor} for {cfg.patience} epochs")
                run.set_summary({prefix + "stopped_epoch": epoch})
            if distributed.is_main():
                save_state(resume_path or out_dir / RESUME_FILE, {"run_id": run.id, "config": cfg.to_dict(), **run.position(),
                                                   "next_epoch": cfg.epochs + 1 if early_stop else epoch + 1,
                                                   **training_state(stepper, keeper, best_probs)}, keeper.writer)
            if early_stop:
                break
        log_best_model(run, keeper, model_name)
        if best_probs is not None:
            submit_report(cfg, run, out_dir, prefix, data, val_idx, best_probs, keeper, val_images)  # every epoch's curves
    finally:
        keeper.writer.close()  # every checkpoint and resume.pt written (a write error is raised here)

    test_probs = None
    if data.test_items and distributed.is_main():
        best, meta = load_model(keeper.best_path, device)  # the checkpoint alone, as a user would
        test_tf = eval_transform(meta["img_size"], meta["mean"], meta["std"])
        test_loader = make_loader(ImageDataset(data.test_items, data.test_labels, test_tf), cfg.batch_size, workers, device)
        if cfg.test_bn == "adapt":
            adapt_test_bn(best, test_loader, device, cfg.model)
        test_probs = predict_probs(best, test_loader, device, amp_dtype, cfg.tta)
    return FitResult(val_idx, best_probs, keeper.best_score, keeper.best_epoch, keeper.best_path, test_probs)


def submit_report(cfg: Config, run, out_dir: Path, prefix: str, data, val_idx: np.ndarray, probs: np.ndarray,
                  keeper: CheckpointKeeper, val_images: list) -> None:
    """out_dir/report.html (workflows/report.py) for the best epoch so far, written on the checkpoint writer's thread."""
    if not distributed.is_main():
        return
    summary = {"run": run.id, **({"fold": cfg.fold} if prefix else {}), "model": cfg.model, "img_size": cfg.img_size,
               "loss": cfg.loss, "optimizer": cfg.optimizer, "lr": cfg.lr, "epochs": cfg.epochs,
               "best_epoch": keeper.best_epoch, cfg.monitor: keeper.best_score}
    args = (out_dir / "report.html", f"{cfg.model}, run {run.id} {prefix.rstrip('/')}", summary, run.history(prefix),
            data.classes, data.labels[val_idx], probs, [data.ids[i] for i in val_idx],
            lambda r: load_image(val_images[r]), cfg.table_rows)
    keeper.writer.submit(lambda: write_report(*args))


def log_best_model(run, keeper: CheckpointKeeper, name: str) -> None:
    """The best checkpoint as W&B artifact `name` (aliases best, latest, epoch-N), once per fit, at its end or
    its stop: one staged copy per run instead of one per new best (CPU on the training path, and disk)."""
    keeper.flush()
    if keeper.best_epoch is not None and distributed.is_main():
        meta = read_meta(keeper.best_path)
        (meta.get("lineage") or {}).get("code", {}).pop("diff", None)  # in the file and the run's diff.patch; not in W&B metadata
        run.log_artifact(keeper.best_path, name, "model", meta, aliases=["best", "latest", f"epoch-{keeper.best_epoch}"])


def cross_validate(cfg: Config, run, out_dir: Path, data, stop: StopSignal, state: dict | None = None,
                   lineage_meta: dict | None = None, shift: dict | None = None,
                   pseudo: tuple | None = None) -> tuple[dict, np.ndarray | None]:
    """All folds in one run: the monitored metric is their mean (std beside it); out-of-fold
    probabilities of every training image go to oof.csv and a W&B artifact; the test set gets the
    folds' average. Resuming, folds done before `state`'s are read back from fold<k>/result.npz."""
    oof, folds, results = np.full((len(data.labels), len(data.classes)), np.nan), np.zeros(len(data.labels), int), []
    start = state["config"]["fold"] if state else 0
    for k in range(cfg.folds):
        fold_dir = out_dir / f"fold{k}"
        if k < start:
            r = FitResult(**load_arrays(fold_dir / "result.npz"), best_path=fold_dir / "best.safetensors")
        else:
            r = fit(dataclasses.replace(cfg, fold=k), run, fold_dir, data, stop, prefix=f"fold{k}/",
                    state=state if k == start else None, resume_path=out_dir / RESUME_FILE, lineage_meta=lineage_meta,
                    shift=shift, pseudo=pseudo)
            if distributed.is_main():
                save_arrays(fold_dir / "result.npz", {f: getattr(r, f) for f in ("val_idx", "val_probs", "best_score",
                                                                               "best_epoch", "test_probs")})
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


def data_source(cfg: Config, run) -> tuple[str, str | None]:
    """--data as a folder (wandb:E/P/NAME:ALIAS downloaded by rank 0) and the dataset artifact; every rank gets
    rank 0's answer, or its error."""
    try:
        answer = lineage.data_source(cfg.data, run, cfg.cache_dir) if distributed.is_main() else None
    except UserError as e:
        answer = str(e)
    answer = distributed.broadcast(answer)
    if isinstance(answer, str):
        raise UserError(answer)
    return answer


def test_shift(cfg: Config, run, data, native: int | None) -> dict | None:
    """The test set measured against the training set (datasets/shift.py), when --aug_preset auto or --val_noise
    auto asks for it and there is a test set: printed, and in the W&B config as test_shift."""
    if not data.test_items or (cfg.aug_preset != "auto" and cfg.val_noise != "auto"):
        if cfg.aug_preset == "auto":
            print("aug_preset auto: no test set to measure, so the `light` preset")
        return None
    start = time.perf_counter()
    shift = measure_data(data.items, data.test_items, cfg.img_size, native)
    print(f"{describe_shift(shift)}\n  ({time.perf_counter() - start:.1f}s; aug_preset {cfg.aug_preset}, "
          f"val_noise {cfg.val_noise})")
    run.update_config({"test_shift": shift})
    return shift


def resolve_auto(cfg: Config, run, data) -> Config:
    """--model auto, --img_size 0 and --pretrained auto, decided from the data and this machine; printed, and the
    decided values replace them in the W&B config (the keys that were auto are listed under `auto`)."""
    demo = cfg.data == "digits"  # the demo keeps its fast settings
    values = {"model": DEMO_MODEL if demo else DEFAULT_MODEL} if cfg.model == "auto" else {}
    model = values.get("model", cfg.model)
    if not cfg.img_size:
        side = native_side(list(data.items) + list(data.test_items or []))
        values["img_size"] = 48 if demo else int(min(max(MIN_AUTO_SIZE, 32 * round(side / 32)),
                                                     max(MIN_AUTO_SIZE, pretrained_input_size(model))))
    if cfg.pretrained == "auto":
        path, why = ("", "the digits demo trains from random initialization") if demo or cfg.pretrained_path \
            else find_pretrained(model)
        values |= {"pretrained": "true", "pretrained_path": path} if path else {"pretrained": "false"}
        print(f"pretrained auto: {why}")
    if values:
        print("auto: " + ", ".join(f"{k} {v}" for k, v in values.items()))
        run.update_config({**values, "auto": sorted(values)})
    return dataclasses.replace(cfg, **values)


def pseudo_labels(cfg: Config, run, data, lineage_meta: dict | None) -> tuple | None:
    """--pseudo_labels: (test rows, labels) at or above --pseudo_threshold, counted per class in the log, the W&B
    config (pseudo_label_source: file, digest, the run or ensemble that wrote it) and every checkpoint's lineage;
    the file itself is an artifact of the run."""
    if not cfg.pseudo_labels:
        return None
    rows, labels, info = read_pseudo_labels(cfg.pseudo_labels, data, cfg.pseudo_threshold)
    print(f"pseudo-labels: {info['added']} of {info['test_images']} test images at p >= {cfg.pseudo_threshold} "
          f"({', '.join(f'{c} {n}' for c, n in info['per_class'].items())}) from {'; '.join(info['source'])}")
    run.update_config({"pseudo_label_source": info})
    run.set_summary({"pseudo_labels/added": info["added"],
                               **{f"pseudo_labels/{c}": n for c, n in info["per_class"].items()}})
    run.use_file(Path(cfg.pseudo_labels), f"pseudo-labels-{info['sha256'][:12]}", "pseudo-labels", info)
    if lineage_meta is not None:
        lineage_meta["pseudo_labels"] = info
    return rows, labels


def train(cfg: Config, run, out_dir: Path, stop: StopSignal, state: dict | None = None) -> None:
    source, artifact = data_source(cfg, run)
    data = load_data(source, cfg.image_col, cfg.label_col, cfg.group_col, cfg.skip_bad_images)
    given, cfg = cfg, resolve_auto(cfg, run, data)  # the lineage records what was asked: auto, not its answer
    source_rows = lineage.manifest(data)  # before screening replaces the paths with decoded images
    if cfg.label_fixes:
        fixed, excluded = apply_label_fixes(data, cfg.label_fixes)
        print(f"--label_fixes {cfg.label_fixes}: {fixed} label(s) changed, {excluded} image(s) excluded")
        run.set_summary({"label_fixes/changed": fixed, "label_fixes/excluded": excluded})
    rows = lineage.manifest(data) if cfg.label_fixes else source_rows
    native = native_side(data.test_items) if data.test_items else None  # before the cache resizes them
    start = time.perf_counter()
    skipped = screen_images(data, cfg.skip_bad_images, cfg.cache, cfg.img_size, cfg.cache_dir or None)
    print(f"images {'cached' if cfg.cache != 'none' else 'checked'} in {time.perf_counter() - start:.1f}s"
          + (f" ({data.items.path})" if getattr(data.items, "path", None) else ""))
    if skipped:
        print(f"skipped {len(skipped)} unreadable training image(s): {skipped[:20]}")
        run.set_summary({"skipped_images": skipped})
    lineage_meta = None
    if distributed.is_main():
        kept = set(data.ids)  # the images that train: skipped ones left out
        lineage_meta = lineage.record(given, run, out_dir, [r for r in rows if r[0] != "train" or r[1] in kept], data.classes,
                                      source_rows, artifact, resumed=state is not None)
    shift = test_shift(cfg, run, data, native)
    pseudo = pseudo_labels(cfg, run, data, lineage_meta)
    if cfg.cv:
        summary, test_probs = cross_validate(cfg, run, out_dir, data, stop, state, lineage_meta, shift, pseudo)
    else:
        r = fit(cfg, run, out_dir, data, stop, state=state, lineage_meta=lineage_meta, shift=shift, pseudo=pseudo)
        summary, test_probs = {cfg.monitor: r.best_score, "best_epoch": r.best_epoch}, r.test_probs
    if not distributed.is_main():
        return
    summary["out_dir"] = str(out_dir)
    if test_probs is not None:
        write_submission(out_dir / "submission.csv", data, test_probs.argmax(1))
        run.log_artifact(out_dir / "submission.csv", f"submission-{run.id}", "submission",
                              {cfg.monitor: summary[cfg.monitor]})
        if data.test_labels is not None:
            tm = classification_metrics(data.test_labels, test_probs)
            summary |= {"test/acc": tm["acc"], "test/f1_macro": tm["f1_macro"], "test/acsa": tm["acsa"], "test/auc_macro": tm["auc_macro"]}
    run.set_summary(summary)
    print(f"best {cfg.monitor} {summary[cfg.monitor]:.4f}"
          + (f" at epoch {summary['best_epoch']}" if "best_epoch" in summary else " (mean over folds)")
          + (f" | test/f1_macro {summary['test/f1_macro']:.4f}" if "test/f1_macro" in summary else "")
          + (f" | wrote {out_dir / 'submission.csv'}" if test_probs is not None else ""))


def main(argv: list[str] | None = None) -> int:
    with StopSignal() as stop:  # from the start: a stop during set-up still finishes the W&B run
        cfg = parse_config(argv)
        try:
            rank, world = distributed.setup(pick_device(cfg.device))  # torchrun: one process per GPU; else (0, 1)
        except UserError as e:
            if distributed.local_rank() == 0:
                print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            if rank > 0:
                sys.stdout = open(os.devnull, "w")  # one console log, rank 0's; errors still reach stderr
            return run_and_finish(cfg, stop)
        finally:
            distributed.teardown()


def run_and_finish(cfg: Config, stop: StopSignal) -> int:
    """One run, as a W&B run: exit code 0, 1 (a UserError, one line on stderr) or 128 + signal."""
    if cfg.batch_size % distributed.world_size():
        print(f"error: --batch_size {cfg.batch_size} is the global batch and must split evenly over the "
              f"{distributed.world_size()} processes", file=sys.stderr)
        return 1
    run_id = distributed.broadcast(new_run_id())
    out_dir = Path(cfg.out_dir or Path(os.environ.get("SWEEPCLS_RUNS_DIR") or "runs") / run_id)
    try:
        state, out_dir = resume_from(cfg, out_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run = tracking.init(cfg.to_dict(), state["run_id"] if state else run_id, out_dir, cfg.wandb_mode,
                        project=cfg.project, entity=cfg.entity, name=cfg.run_name, resume=state, console=cfg.wandb_console, record=distributed.is_main(),
                        notes=cfg.notes, tags=cfg.tags)
    try:
        cfg = Config.from_dict(distributed.broadcast(run.config(exclude=ADDED_CONFIG_KEYS)))  # values a sweep locked win, on every rank
        train(cfg, run, out_dir, stop, state)  # a stop after the last epoch: done anyway
        if distributed.is_main():
            (out_dir / RESUME_FILE).unlink(missing_ok=True)  # finished: nothing to resume
    except UserError as e:
        run.set_summary({"error": str(e)})
        run.finish(exit_code=1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        run.finish(exit_code=e.exit_code)
        print(f"stopped by {e}: the weights at the stop are in last.safetensors under {out_dir}; W&B run finished "
              f"(exit code {e.exit_code})", file=sys.stderr)
        return e.exit_code
    except BaseException:
        run.finish(exit_code=1)
        raise
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
