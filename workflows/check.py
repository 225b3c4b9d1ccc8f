"""train.py --check: the run a command would start, resolved and printed, with nothing written and no W&B run.

Usage: python train.py --data /data/comp --model convnext_tiny --check     # exit 0: the plan; 1: what is wrong
       print(plan(cfg))
It runs every check a run makes before its first epoch that costs seconds, not minutes: the flags, the model's
name, the data (read, split, counted per class), what auto comes to, the output folder, the W&B mode and the
device. The test set's shift measure and the image decode are left to the run (they are cached for it).
"""
import math
import os
from pathlib import Path

import numpy as np

from datasets import load_data, split_indices
from models import build_model
from utils import UserError, report_error, tracking
from utils.device import pick_device
from utils.runs import DEFAULT_PROJECT, run_folder
from workflows import prepare, resume
from workflows.config import Config
from workflows.lineage import changes, compact, defaults


def main(cfg: Config) -> int:
    """train.py --check: the plan printed, exit 0; what would stop the run, one error line, exit 1."""
    try:
        print(plan(cfg))
        return 0
    except UserError as e:
        return report_error(e)


def plan(cfg: Config) -> str:
    """The resolved plan, line by line; raises UserError where the run would stop before training."""
    cfg.validate()
    prepare.check_before_start(cfg)
    mode = tracking.resolve_mode(cfg.wandb_mode)
    lines = [f"changed from the defaults: {compact(changes(cfg.to_dict(), defaults())) or 'nothing'}"]
    if cfg.data.startswith("wandb:"):
        lines.append(f"data {cfg.data}: a W&B artifact, downloaded when the run starts (not checked here)")
        values = {}
    else:
        data = load_data(cfg.data, cfg.image_col, cfg.label_col, cfg.group_col, cfg.skip_bad_images)
        values = prepare.auto_values(cfg, data)
        lines += describe_data(cfg, data)
    model = values.get("model", cfg.model)
    img_size = values.get("img_size", cfg.img_size)
    net = build_model(model, 2, img_size=img_size)  # random weights: only its size, nothing downloaded
    params = sum(p.numel() for p in net.parameters()) / 1e6
    auto = f" (auto: {', '.join(f'{k} {v}' for k, v in values.items())})" if values else ""
    lines.append(f"model {model}, {params:.1f} M parameters, img_size {img_size}, pretrained "
                 f"{values.get('pretrained', cfg.pretrained)}{auto}")
    lines += [describe_out_dir(cfg, model),
              f"W&B: {mode}" + (f", project {cfg.project or os.environ.get('WANDB_PROJECT') or DEFAULT_PROJECT}"
                                if mode != "disabled" else ""),
              f"device: {pick_device(cfg.device)}",
              "the checks passed; nothing was written. The same command without --check starts the run."]
    return "\n".join(lines)


def describe_data(cfg: Config, data) -> list[str]:
    """The images per class, the split, the steps an epoch takes, the test set."""
    counts = np.bincount(data.labels, minlength=len(data.classes))
    order = np.argsort(-counts, kind="stable")
    per_class = ", ".join(f"{data.classes[i]} {counts[i]}" for i in order[:20]) + (" ..." if len(order) > 20 else "")
    train_idx, val_idx = split_indices(data.labels, data.groups, cfg.val_fraction, cfg.folds, cfg.fold, cfg.seed,
                                       data.given_val)
    how = (f"{cfg.folds} folds, every one trained (--cv)" if cfg.cv else f"fold {cfg.fold} of {cfg.folds}"
           if cfg.folds else "the data's own val/ folder" if data.given_val is not None
           else f"a stratified {cfg.val_fraction:.0%} holdout, seed {cfg.seed}")
    n = len(train_idx)
    batches = n // cfg.batch_size if n > cfg.batch_size else 1  # the loader drops a last, short batch
    steps = math.ceil(batches / cfg.accum_steps)
    return [f"data {cfg.data}: {len(data.labels)} labelled images, {len(data.classes)} classes "
            f"(largest/smallest {counts.max()}/{max(counts.min(), 1)}): {per_class}",
            f"split: {len(train_idx)} train, {len(val_idx)} validation, by {how}; about {steps} optimizer steps "
            f"per epoch, {steps * cfg.epochs} in {cfg.epochs} epochs",
            f"test set: {len(data.test_items)} images" + (", labelled" if data.test_labels is not None else "")
            if data.test_items else "test set: none (no submission.csv is written)"]


def describe_out_dir(cfg: Config, model: str) -> str:
    """Where the run would write, and what it would find there."""
    if not cfg.out_dir:
        return f"output: {run_folder('<new id>', cfg.run_name or model)}/ (a new folder)"
    out_dir = Path(cfg.out_dir)
    parent = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        return f"output: {out_dir}/ cannot be written ({parent} is not writable): the run would stop there"
    if resume.find_resume(cfg.resume, out_dir) is not None:
        return f"output: {out_dir}/ holds an interrupted run: the run continues it (--resume {cfg.resume})"
    if out_dir.is_dir() and (held := resume.results_in(out_dir, cfg.monitor)):
        return f"output: {out_dir}/ holds {held}: the run would refuse it; --restart moves it aside first"
    return f"output: {out_dir}/"
