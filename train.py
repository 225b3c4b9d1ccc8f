"""Train one image classifier; every run is a W&B run (online with an API key, else offline).

Usage:
    python train.py                                   # the digits demo: clean train set, noisy test set
    python train.py --data PATH --model convnext_tiny --img_size 224 --epochs 30
    python train.py --help                            # every key with its default and meaning
Under `wandb agent`, the same flags arrive as --key=value and values the sweep locks win.
"""
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets import ImageDataset, SeededSampler, load_data, load_image, split_indices, write_submission
from datasets.transforms import AUGS, eval_transform
from losses import build_loss
from models import build_model, normalization
from optim import build_optimizer, build_scheduler
from utils import UserError, tracking
from utils.checkpoint import CheckpointKeeper, load_model
from utils.config import Config, parse_config
from utils.metrics import classification_metrics


# ----------------------------------------------------------------------------- set-up
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is visible; use --device auto or cpu")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, sampler=None, drop_last=False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------- train / predict
def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, amp_dtype, desc="") -> float:
    model.train()
    total, seen = 0.0, 0
    for images, labels, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        images = to_input(images, device)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss = loss_fn(logits.float(), labels)  # losses in fp32, also under AMP
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(labels)
        seen += len(labels)
    return total / max(seen, 1)


@torch.no_grad()
def predict_logits(model, loader, device, amp_dtype) -> np.ndarray:
    model.eval()
    out = []
    for images, _, _ in tqdm(loader, desc="predict", leave=False, disable=None):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(model(to_input(images, device)).float().cpu())
    return torch.cat(out).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).softmax(1).numpy()


# ----------------------------------------------------------------------------- one run
def fit(cfg: Config, run, out_dir: Path) -> None:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    amp_dtype = amp_dtype_for(device, cfg.amp)
    data = load_data(cfg.data, cfg.image_col, cfg.label_col, cfg.group_col)
    classes = data.classes
    train_idx, val_idx = split_indices(data.labels, data.groups, cfg.val_fraction, cfg.folds, cfg.fold, cfg.seed)
    y_val = data.labels[val_idx]
    metric_keys = ["train/loss", "val/loss", "val/acc", "val/f1_macro", "val/acsa"] + [f"val/f1/{c}" for c in classes]
    if cfg.monitor not in metric_keys:
        raise UserError(f"--monitor {cfg.monitor!r} is not a logged metric; choose one of {metric_keys}")

    model = build_model(cfg.model, len(classes), cfg.pretrained, cfg.pretrained_path).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    mean, std = normalization(model)
    eval_tf = eval_transform(cfg.img_size, mean, std)
    workers = cfg.workers if cfg.workers >= 0 else min(8, os.cpu_count() or 1)
    train_ds = ImageDataset([data.items[i] for i in train_idx], data.labels[train_idx],
                            AUGS.build(cfg.aug_preset, cfg.img_size, mean, std))
    sampler = SeededSampler(len(train_ds), cfg.seed)
    train_loader = make_loader(train_ds, cfg.batch_size, workers, device, sampler, drop_last=len(train_ds) > cfg.batch_size)
    val_loader = make_loader(ImageDataset([data.items[i] for i in val_idx], y_val, eval_tf), cfg.batch_size, workers, device)

    loss_fn = build_loss(cfg.loss)
    optimizer = build_optimizer(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps=cfg.epochs * len(train_loader))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    keeper = CheckpointKeeper(out_dir, cfg.keep_top_k, cfg.maximize)
    meta_base = dict(format="sweepcls/1", model=cfg.model, classes=classes, targets=data.targets,
                     img_size=cfg.img_size, mean=mean, std=std, config=cfg.to_dict(), run_id=run.id)
    print(f"{cfg.model} on {device} | {len(classes)} classes | train {len(train_idx)}, val {len(val_idx)}, "
          f"test {len(data.test_items or [])} | out {out_dir}")

    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, scaler, device, amp_dtype,
                                     desc=f"epoch {epoch}/{cfg.epochs}")
        if not np.isfinite(train_loss):
            raise UserError(f"training loss is {train_loss} at epoch {epoch}; lower --lr or check the data")
        logits = predict_logits(model, val_loader, device, amp_dtype)
        probs = softmax(logits)
        m = classification_metrics(y_val, probs)
        metrics = {
            "epoch": epoch, "lr": lr, "train/loss": train_loss,
            # cross-entropy whatever --loss is, so runs with different losses compare
            "val/loss": F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val)).item(),
            "val/acc": m["acc"], "val/f1_macro": m["f1_macro"], "val/acsa": m["acsa"],
            **{f"val/f1/{c}": float(f) for c, f in zip(classes, m["f1"])},
            "train/epoch_seconds": time.perf_counter() - start,
        }
        meta = {**meta_base, "epoch": epoch, "metrics": {k: metrics[k] for k in metric_keys[:5]}}
        if keeper.update(model, meta, epoch, metrics[cfg.monitor]):
            tracking.log_eval_tables(run, "val", [data.ids[i] for i in val_idx], lambda r: load_image(data.items[val_idx[r]]),
                                     y_val, probs, classes, m, cfg.table_rows)
            tracking.log_artifact(run, keeper.best_path, f"model-{run.id}", "model", meta,
                                  aliases=["best", "latest", f"epoch-{epoch}"])
        tracking.log(run, metrics)
        tracking.set_summary(run, {cfg.monitor: keeper.best_score, "best_epoch": keeper.best_epoch})
        print(f"epoch {epoch:>3}/{cfg.epochs} | train/loss {train_loss:.4f} | val/loss {metrics['val/loss']:.4f} | "
              f"val/acc {m['acc']:.4f} | val/f1_macro {m['f1_macro']:.4f} | val/acsa {m['acsa']:.4f} | "
              f"{metrics['train/epoch_seconds']:.1f}s{' | best' if keeper.best_epoch == epoch else ''}")

    summary = {cfg.monitor: keeper.best_score, "best_epoch": keeper.best_epoch, "out_dir": str(out_dir)}
    if data.test_items:
        best, meta = load_model(keeper.best_path, device)  # the checkpoint alone, as a user would
        test_tf = eval_transform(meta["img_size"], meta["mean"], meta["std"])
        test_loader = make_loader(ImageDataset(data.test_items, data.test_labels, test_tf), cfg.batch_size, workers, device)
        test_probs = softmax(predict_logits(best, test_loader, device, amp_dtype))
        write_submission(out_dir / "submission.csv", data, test_probs.argmax(1))
        tracking.log_artifact(run, out_dir / "submission.csv", f"submission-{run.id}", "submission",
                              {"best_epoch": keeper.best_epoch, cfg.monitor: keeper.best_score})
        if data.test_labels is not None:
            tm = classification_metrics(data.test_labels, test_probs)
            summary |= {"test/acc": tm["acc"], "test/f1_macro": tm["f1_macro"], "test/acsa": tm["acsa"]}
    tracking.set_summary(run, summary)
    print(f"best {cfg.monitor} {keeper.best_score:.4f} at epoch {keeper.best_epoch}"
          + (f" | test/f1_macro {summary['test/f1_macro']:.4f}" if "test/f1_macro" in summary else "")
          + (f" | wrote {out_dir / 'submission.csv'}" if data.test_items else ""))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    run_id = tracking.new_run_id()
    out_dir = Path(cfg.out_dir or Path("runs") / run_id)
    run = tracking.init(cfg.to_dict(), run_id, out_dir, cfg.wandb_mode, cfg.project, cfg.entity, cfg.run_name)
    try:
        fit(Config.from_dict(tracking.config(run)), run, out_dir)
    except UserError as e:
        tracking.set_summary(run, {"error": str(e)})
        tracking.finish(run, exit_code=1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        tracking.finish(run, exit_code=1)
        raise
    tracking.finish(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
