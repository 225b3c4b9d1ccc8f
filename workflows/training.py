"""One fit's set-up, as train.py's fit runs it: the split, the loaders (noisy validation images under
--val_noise auto), loss and mixup, the model, optimizer, schedule, EMA and stepper, the checkpoint keeper;
then evaluate(), which returns the validation probabilities, and epoch_metrics(), the row logged per epoch;
at the end predict_test(), which first decides the test-time steps (--tta/--test_bn auto, workflows/test_time.py).

Usage:
    s = build_fit(cfg, run.id, out_dir, FitInputs(data, shift=shift), prefix="")
    probs, clean_probs = evaluate(s, cfg.tta)
    scores, per_class = epoch_metrics(data.labels[s.val_idx], data.classes, probs, clean_probs)
    test_probs = predict_test(cfg, run, data, s)   # test-time steps decided and recorded, then the best file alone
"""
import copy
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3

from datasets import ImageDataset, build_sampler, split_indices
from datasets.cache import JoinedImages
from datasets.corruption import any_on, noisy_copies, with_floor
from datasets.files import take
from datasets.transforms import AUGS, eval_transform, with_augmix
from losses import build_loss, loss_kwargs, soft_target_losses
from models import adapt_test_bn, batchnorm_layers, build_model, check_input_size, normalization
from models.checkpoint import CheckpointKeeper, load_model, read_meta, update_meta
from optim import SAM, build_optimizer, build_scheduler, optimizer_kwargs, scheduler_kwargs
from optim.stepper import Stepper
from utils import UserError, distributed
from utils.background import BackgroundWriter
from utils.device import amp_dtype_for, default_workers, make_loader, pick_device, seed_everything
from utils.metrics import classification_metrics, nll
from workflows import test_time
from workflows.config import Config
from workflows.inference import predict_probs

SCALAR_KEYS = ["train/loss", "val/loss", "val/acc", "val/f1_macro", "val/acsa", "val/auc_macro"]
CLEAN_KEYS = ["val_clean/loss", "val_clean/acc", "val_clean/f1_macro"]  # beside val/* when validation is noisy
BEST_UPLOAD_SECONDS = 120.0  # --log_model best, online: at most one staged copy per this long; the newest best at exit


@dataclass
class ModelLog:
    """--log_model: which checkpoints become versions of the W&B artifact model-<run id>[-fold<k>]. `best` logs a
    new best when the last upload is BEST_UPLOAD_SECONDS old (online; offline every version would be one more
    staged copy, so offline waits for the exit); every exit Python survives logs the newest best it has not logged
    (log_pending), and a resumed run catches up on one a SIGKILL kept from W&B."""
    policy: str                     # off | end | best | all
    online: bool
    logged_epoch: int | None = None  # the best epoch whose checkpoint W&B has
    last_upload: float = field(default=-math.inf)
    newest_epoch: int | None = None  # --log_model all: the epoch whose version holds the alias `latest`

    def after_epoch(self, run, s: "FitSetup", epoch: int) -> None:
        best = s.keeper.best_epoch == epoch
        if self.policy == "all":
            s.keeper.flush()
            self._log(run, s, s.keeper.dir / "last.safetensors", epoch,
                      ["latest", f"epoch-{epoch}"] + (["best"] if best else []))
            self.logged_epoch = s.keeper.best_epoch if best else self.logged_epoch
            self.newest_epoch = epoch
        elif (self.policy == "best" and self.online and s.keeper.best_epoch != self.logged_epoch
              and time.monotonic() - self.last_upload >= BEST_UPLOAD_SECONDS):
            self.log_pending(run, s)

    def resume(self, run, s: "FitSetup", logged_epoch: int | None) -> None:
        """A resumed fit: online, the best a SIGKILL kept from W&B goes now (offline, the exit logs it anyway). The
        last attempt counted a best as logged when it handed it to W&B; the upload may not have finished before a
        stop's deadline or a SIGKILL ended it, so unless the server has that version committed it is logged again
        (the same file: W&B makes no second version of identical contents)."""
        self.logged_epoch = logged_epoch
        if self.online:
            if logged_epoch is not None and not run.has_artifact(s.artifact_name, f"epoch-{logged_epoch}"):
                self.logged_epoch = None
            self.log_pending(run, s)

    def log_pending(self, run, s: "FitSetup") -> None:
        """The newest best, unless W&B has it already (or --log_model off)."""
        s.keeper.flush()
        if self.policy != "off" and s.keeper.best_epoch not in (None, self.logged_epoch):
            epoch = s.keeper.best_epoch
            latest = epoch >= (self.newest_epoch or epoch)  # `all`: a later epoch's version keeps `latest`
            self._log(run, s, s.keeper.best_path, epoch, ["best", *(["latest"] if latest else []), f"epoch-{epoch}"])
            self.logged_epoch = epoch

    def best_rewritten(self, s: "FitSetup") -> None:
        """best.safetensors was replaced (its test-time decision recorded): a version W&B already has lacks it, so
        log_pending logs the file again."""
        if self.logged_epoch == s.keeper.best_epoch:
            self.logged_epoch = None

    def _log(self, run, s: "FitSetup", path: Path, epoch: int, aliases: list[str]) -> None:
        if not distributed.is_main():
            return
        meta = read_meta(path)
        (meta.get("lineage") or {}).get("code", {}).pop("diff", None)  # in the file and the run's diff.patch only
        run.log_artifact(path, s.artifact_name, "model", meta, aliases=aliases)
        self.last_upload = time.monotonic()


@dataclass
class FitInputs:
    """What every fit of a run trains from: the data (datasets.Data), and what the run prepared before its fits."""
    data: object
    lineage_meta: dict | None = None  # goes in every checkpoint (workflows/lineage.record)
    shift: dict | None = None  # the test set's measured corruption (datasets/shift.measure_data), for the auto keys
    pseudo: tuple | None = None  # (test rows, their labels) that train beside the training split
    final: bool = False  # the final fit (--final_fit): every labelled image trains; validation is in training
    test_time: dict | None = None  # the final fit: its holdout's test-time decision (not decided again)


@dataclass
class FitSetup:
    """Everything one fit trains, evaluates and checkpoints with."""
    device: torch.device
    amp_dtype: torch.dtype | None
    workers: int
    train_size: int          # training images, pseudo-labelled ones included
    val_idx: np.ndarray      # rows of the data that validate
    val_part: np.ndarray     # this rank's share of them (the metrics use every rank's predictions)
    val_images: list         # what validates: noisy copies under --val_noise auto, else the images themselves
    scalar_keys: list[str]   # the scores each checkpoint's metadata keeps
    sampler: object
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    clean_loader: torch.utils.data.DataLoader | None  # the clean validation images, when val/* are noisy
    mixup: Mixup | None
    stepper: Stepper
    eval_model: torch.nn.Module  # the EMA weights when on: what is evaluated and checkpointed
    keeper: CheckpointKeeper
    meta: dict               # checkpoint metadata every epoch shares
    artifact_name: str       # the W&B model artifact of this fit
    model_log: ModelLog      # which checkpoints go to W&B, and when


def build_fit(cfg: Config, run_id: str, out_dir: Path, inputs: FitInputs, prefix: str = "",
              online: bool = False) -> FitSetup:
    """The set-up of fold cfg.fold (or the holdout split) from the run's inputs: its shift drives --aug_preset auto
    and --val_noise auto, its pseudo-labelled test images train beside the training split."""
    data, lineage_meta, shift, pseudo = inputs.data, inputs.lineage_meta, inputs.shift, inputs.pseudo
    seed_everything(cfg.seed)
    device = distributed.device_for(pick_device(cfg.device))
    train_idx, val_idx = split_indices(data.labels, data.groups, cfg.val_fraction, cfg.folds, cfg.fold, cfg.seed,
                                       data.given_val)
    if inputs.final:  # its validation scores only show the fit is sane: it trains on those images too
        train_idx = np.arange(len(data.labels))
    train_items, y_train = take(data.items, train_idx), data.labels[train_idx]
    if pseudo is not None:  # confident test images, in training only
        train_items = JoinedImages(train_items, take(data.test_items, pseudo[0]))
        y_train = np.concatenate([y_train, pseudo[1]])
    settings = with_floor(shift["settings"], cfg.aug_floor) if shift else None
    noisy_val = cfg.val_noise == "auto" and any_on(settings)  # val/* noisy, val_clean/* clean
    scalar_keys = SCALAR_KEYS + (CLEAN_KEYS if noisy_val else [])
    metric_keys = scalar_keys + [f"val/f1/{c}" for c in data.classes] + (["epoch"] if inputs.final else [])
    if cfg.monitor not in metric_keys:
        raise UserError(f"--monitor {cfg.monitor!r} is not a logged metric; choose one of {metric_keys}")
    loss_fn, mixup = build_loss_and_mixup(cfg, y_train, len(data.classes), device)
    model = build_fit_model(cfg, len(data.classes), device)
    mean, std = normalization(model)
    workers = default_workers(cfg.workers, distributed.world_size())
    aug = with_augmix(AUGS.build(cfg.aug_preset, cfg.img_size, cfg.aug_strength, mean, std,
                                 **({"settings": settings} if cfg.aug_preset == "auto" else {})), cfg.augmix)
    train_ds = ImageDataset(train_items, y_train, aug)
    sampler = build_sampler(cfg.sampler, y_train, cfg.seed, distributed.rank(), distributed.world_size())
    train_loader = make_loader(train_ds, cfg.batch_size // distributed.world_size(), workers, device, sampler,
                               drop_last=len(train_ds) > cfg.batch_size)
    val_part = distributed.shard(len(val_idx))
    val_items = take(data.items, val_idx)
    val_images = (noisy_copies(val_items, [data.ids[i] for i in val_idx], settings, cfg.img_size) if noisy_val
                  else val_items)

    def val_loader(images):
        dataset = ImageDataset(take(images, val_part), data.labels[val_idx][val_part],
                               eval_transform(cfg.img_size, mean, std))
        return make_loader(dataset, cfg.batch_size, workers, device)
    stepper = build_stepper(cfg, model, loss_fn, device, math.ceil(len(train_loader) / cfg.accum_steps))
    keeper = CheckpointKeeper(out_dir, cfg.keep_top_k, cfg.maximize, write=distributed.is_main(),
                              writer=BackgroundWriter("checkpoint-writer"))  # files written while the next epoch trains
    meta = dict(format="sweepcls/1", model=cfg.model, classes=data.classes, targets=data.targets, img_size=cfg.img_size,
                mean=mean, std=std, config=cfg.to_dict(), run_id=run_id, fold=cfg.fold, lineage=lineage_meta,
                test_shift=shift, **({"test_time": inputs.test_time} if inputs.test_time else {}))
    return FitSetup(device=device, amp_dtype=stepper.amp_dtype, workers=workers, train_size=len(train_ds),
                    val_idx=val_idx, val_part=val_part, val_images=val_images, scalar_keys=scalar_keys, sampler=sampler,
                    train_loader=train_loader, val_loader=val_loader(val_images),
                    clean_loader=val_loader(val_items) if noisy_val else None, mixup=mixup, stepper=stepper,
                    eval_model=stepper.ema.module if stepper.ema is not None else model, keeper=keeper, meta=meta,
                    artifact_name=f"model-{run_id}{'-' + prefix.rstrip('/') if prefix else ''}",
                    model_log=ModelLog(cfg.log_model, online))


def build_loss_and_mixup(cfg: Config, y_train: np.ndarray, num_classes: int, device) -> tuple:
    loss_fn = build_loss(cfg.loss, **loss_kwargs(cfg, np.bincount(y_train, minlength=num_classes))).to(device)
    if not (cfg.mixup or cfg.cutmix):
        return loss_fn, None
    if not loss_fn.soft_targets:
        raise UserError(f"--loss {cfg.loss} takes class indices only, but --mixup/--cutmix make soft targets; "
                        f"use one of {soft_target_losses()} or set --mixup 0 --cutmix 0")
    return loss_fn, Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob, label_smoothing=0.0,
                          num_classes=num_classes)


def build_fit_model(cfg: Config, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The timm model on `device` (channels_last on CUDA; SyncBatchNorm under torchrun with --sync_bn)."""
    model = build_model(cfg.model, num_classes, cfg.pretrained == "true", cfg.pretrained_path, cfg.drop_rate,
                        cfg.drop_path_rate, cfg.img_size)
    if cfg.sync_bn and distributed.world_size() > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    check_input_size(model, cfg.model, cfg.img_size)
    return model


def build_stepper(cfg: Config, model: torch.nn.Module, loss_fn, device: torch.device, steps_per_epoch: int) -> Stepper:
    """Optimizer, schedule, AMP scaler, SAM and EMA around the model (DDP-wrapped under torchrun, compiled with
    --compile) as one optimizer step."""
    amp_dtype = amp_dtype_for(device, cfg.amp)
    optimizer = build_optimizer(cfg.optimizer, model, **optimizer_kwargs(cfg))
    stepper = Stepper(model=model, loss_fn=loss_fn, optimizer=optimizer,
                      scheduler=build_scheduler(cfg.scheduler, optimizer, **scheduler_kwargs(cfg, steps_per_epoch)),
                      scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), device=device,
                      amp_dtype=amp_dtype, sam=SAM(optimizer, cfg.sam_rho, cfg.sam_adaptive) if cfg.sam else None,
                      ema=ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None,
                      clip_grad=cfg.clip_grad, nan_patience=cfg.nan_patience, net=distributed.wrap(model, device))
    if cfg.compile:
        stepper.net = torch.compile(stepper.net)
    return stepper


def evaluate(s: FitSetup, tta: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Validation probabilities of every row (all ranks'), and of the clean images when validation is noisy.
    tta auto: without TTA, so every epoch's monitor compares (the views are checked once, at the end: predict_test)."""
    tta = "none" if tta == "auto" else tta

    def probs(loader):
        return distributed.gather_rows(predict_probs(s.eval_model, loader, s.device, s.amp_dtype, tta, "validation"),
                                       s.val_part, len(s.val_idx))
    return probs(s.val_loader), probs(s.clean_loader) if s.clean_loader is not None else None


def epoch_metrics(y_val: np.ndarray, classes: list[str], probs: np.ndarray,
                  clean_probs: np.ndarray | None) -> tuple[dict, dict]:
    """(the validation scores as logged, classification_metrics of the noisy/plain validation for the tables)."""
    m = classification_metrics(y_val, probs)
    metrics = {"val/loss": nll(probs, y_val),  # cross-entropy whatever --loss is, so runs with different losses compare
               **{f"val/{k}": m[k] for k in ("acc", "f1_macro", "acsa", "auc_macro")},
               **{f"val/f1/{c}": float(f) for c, f in zip(classes, m["f1"])}}
    if clean_probs is not None:
        cm = classification_metrics(y_val, clean_probs)
        metrics |= {"val_clean/loss": nll(clean_probs, y_val), "val_clean/acc": cm["acc"],
                    "val_clean/f1_macro": cm["f1_macro"]}
    return metrics, m


def predict_test(cfg: Config, run, data, s: FitSetup, prefix: str = "") -> np.ndarray:
    """The test-time steps decided and recorded in best.safetensors (decide_test_time; before the model artifact is
    logged from it), then the test set's probabilities from that file alone, as a user (predict.py) would load it."""
    s.keeper.flush()  # best.safetensors on disk
    if "test_time" not in s.meta:  # the final fit's is its holdout's, in every checkpoint's metadata
        decide_test_time(cfg, run, data, s, prefix)
    best, meta = load_model(s.keeper.best_path, s.device)
    steps = test_time.resolve(meta, s.keeper.best_path, cfg.tta, cfg.test_bn)  # the decision just recorded
    loader = make_loader(ImageDataset(data.test_items, data.test_labels,
                                      eval_transform(meta["img_size"], meta["mean"], meta["std"])),
                         cfg.batch_size, s.workers, s.device)
    if steps.test_bn == "adapt":
        adapt_test_bn(best, loader, s.device, cfg.model)
    return predict_probs(best, loader, s.device, s.amp_dtype, steps.tta, "test prediction")


def decide_test_time(cfg: Config, run, data, s: FitSetup, prefix: str = "") -> dict:
    """--test_bn and --tta for the test set (workflows/test_time.py), with the best checkpoint: auto decided from
    the measured shift, BatchNorm statistics from the test images and the TTA candidate checked on the validation
    images as they were validated (noisy under --val_noise auto); printed, in the summary (tta_resolved,
    test_bn_resolved; under --cv per fold, and the folds' at the top) and recorded in best.safetensors
    (meta["test_time"])."""
    model, meta = load_model(s.keeper.best_path, s.device)
    labels = data.labels[s.val_idx]

    @functools.cache
    def loader():  # every validation image, not this rank's share: only rank 0 decides
        return make_loader(ImageDataset(s.val_images, labels, eval_transform(meta["img_size"], meta["mean"],
                                                                             meta["std"])),
                           cfg.batch_size, s.workers, s.device)

    @functools.cache
    def adapted():  # BatchNorm statistics from the test images, as predict_test adapts them
        test = make_loader(ImageDataset(data.test_items, None, eval_transform(meta["img_size"], meta["mean"],
                                                                              meta["std"])),
                           cfg.batch_size, s.workers, s.device)
        moved = copy.deepcopy(model)
        adapt_test_bn(moved, test, s.device, cfg.model)
        return moved

    def val_probs(tta: str, test_bn: str = "none") -> np.ndarray:
        return predict_probs(adapted() if test_bn == "adapt" else model, loader(), s.device, s.amp_dtype, tta,
                             "the test-time check")
    settings = (meta.get("test_shift") or {}).get("settings")
    decision = test_time.decide(cfg.tta, cfg.test_bn, settings, len(batchnorm_layers(model)), cfg.model, val_probs,
                                labels, "noisy validation" if s.clean_loader is not None else "validation")
    for line in test_time.describe(decision, prefix):
        print(line)
    update_meta(s.keeper.best_path, {"test_time": decision})
    s.model_log.best_rewritten(s)
    folds = [s.keeper.dir.parent / f"fold{k}" / "best.safetensors" for k in range(cfg.fold + 1)] if prefix else []
    run.set_summary(test_time.summary(decision, prefix) | test_time.folds_summary(folds))
    return decision


def describe_fit(cfg: Config, s: FitSetup, data, prefix: str, out_dir: Path, inputs: FitInputs) -> str:
    """The console line that opens a fit."""
    world, pseudo = distributed.world_size(), inputs.pseudo
    own = s.train_size - (len(pseudo[0]) if pseudo is not None else 0)
    return (f"{cfg.model} on {s.device} | {len(data.classes)} classes | train {own}"
            f"{f' + {len(pseudo[0])} pseudo-labelled' if pseudo is not None else ''}, val {len(s.val_idx)}"
            f"{' (the val/ folder given)' if data.given_val is not None and not cfg.folds else ''}"
            f"{' (final fit: every labelled image trains, validation included)' if inputs.final else ''}, "
            f"test {len(data.test_items or [])} | {cfg.loss}, {cfg.optimizer}{'+SAM' if cfg.sam else ''}, "
            f"{cfg.scheduler}, {cfg.sampler} sampler{', EMA' if cfg.ema else ''} | {s.workers} loader workers"
            f"{f' | {world} processes' if world > 1 else ''} | {prefix}out {out_dir}")


def step_rows(run, prefix: str, every: int):
    """train_one_epoch's on_step: every `every` optimizer steps of the fit, a W&B row of that step's loss and lr
    (Run.log_step); None when every is 0. A resumed fit logs the same steps with the same values."""
    if not every:
        return None
    world = distributed.world_size()

    def on_step(step: int, loss_sum, images: int, lr: float) -> None:
        if step % every == 0:
            run.log_step(prefix, step, {"train/loss_step": float(loss_sum) / max(images * world, 1),
                                        "train/lr_step": lr})
    return on_step
