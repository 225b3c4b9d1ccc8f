"""What train.py decides from the data before it trains: the auto settings (--model auto, --img_size 0,
--pretrained auto), the test set's measured shift (--aug_preset auto, --val_noise auto), and the
pseudo-labelled test images (--pseudo_labels). Each is printed and recorded in the W&B run.

Usage:
    cfg = resolve_auto(cfg, run, data)
    stored = stored_images(data)                                  # before the decode cache resizes them
    shift = measure_test_shift(cfg, run, data, stored)
    pseudo = load_pseudo_labels(cfg, run, data, lineage_meta)   # (test rows, labels) or None
    final_inputs = final_fit_inputs(cfg, run, inputs, holdout_test_probs, decided)  # --final_pseudo's labels too
    folder, artifact = data_source(cfg, run)
"""
import dataclasses
import time
from pathlib import Path

import numpy as np

from datasets.files import native_side
from datasets.pseudo import read_pseudo_labels, select_confident
from datasets.readers import check_source
from datasets.shift_cache import measure_cached
from models import DEFAULT_MODEL, DEMO_MODEL, MIN_AUTO_SIZE, check_model_name, find_pretrained, pretrained_input_size
from utils import UserError, distributed
from workflows import lineage
from workflows.config import Config

DEMO_IMG_SIZE = 48  # px: the digits demo keeps its fast settings


def check_before_start(cfg: Config) -> None:
    """What can be checked before a run folder or a W&B run exists, so a typo leaves nothing behind: the data path,
    the model's name, the files the flags name, a batch that splits over torchrun's processes."""
    check_source(cfg.data)
    if cfg.batch_size % distributed.world_size():
        raise UserError(f"--batch_size {cfg.batch_size} is the global batch and must split evenly over the "
                        f"{distributed.world_size()} processes")
    if cfg.model != "auto":
        check_model_name(cfg.model)
    for flag in ("pretrained_path", "pseudo_labels", "label_fixes"):
        if (path := getattr(cfg, flag)) and not Path(path).is_file():
            raise UserError(f"--{flag} {path}: no such file")


def model_name(cfg: Config) -> str:
    """--model, with auto decided: the digits demo's small model, else the default."""
    return cfg.model if cfg.model != "auto" else DEMO_MODEL if cfg.data == "digits" else DEFAULT_MODEL


def resolve_auto(cfg: Config, run, data) -> Config:
    """--model auto, --img_size 0 and --pretrained auto, decided from the data and this machine; printed, and in the
    W&B config under keys of their own that no sweep locks (`resolved/img_size`, ...: what the dashboard can plot
    and filter on) and in place of the auto values, except where a sweep set the key (wandb keeps a sweep's value);
    the keys that were auto are listed under `auto`."""
    values = auto_values(cfg, data)
    if values:
        print("auto: " + ", ".join(f"{k} {v}" for k, v in values.items()))
        run.update_config({**values, **{f"resolved/{k}": v for k, v in values.items()}, "auto": sorted(values)})
    return dataclasses.replace(cfg, **values)


def auto_values(cfg: Config, data) -> dict:
    """What --model auto, --img_size 0 and --pretrained auto come to for this data (pretrained's reason printed)."""
    demo = cfg.data == "digits"
    values = {"model": model_name(cfg)} if cfg.model == "auto" else {}
    model = values.get("model", cfg.model)
    if not cfg.img_size:
        side = native_side(list(data.items) + list(data.test_items or []))
        values["img_size"] = DEMO_IMG_SIZE if demo else int(min(max(MIN_AUTO_SIZE, 32 * round(side / 32)),
                                                                max(MIN_AUTO_SIZE, pretrained_input_size(model))))
    if cfg.pretrained == "auto":
        path, why = ("", "the digits demo trains from random initialization") if demo or cfg.pretrained_path \
            else find_pretrained(model)
        values |= {"pretrained": "true", "pretrained_path": path} if path else {"pretrained": "false"}
        print(f"pretrained auto: {why}")
    return values


def stored_images(data) -> tuple[list, list, list]:
    """(training images, their ids, test images) as stored (paths or arrays), taken before the decode cache
    replaces them with copies at the training size: the shift is measured where the test set got it."""
    return list(data.items), list(data.ids), list(data.test_items or [])


def measure_test_shift(cfg: Config, run, data, stored: tuple[list, list, list]) -> dict | None:
    """The test set measured against the training set (datasets/shift.py), when --aug_preset auto or --val_noise
    auto asks for it and there is a test set: printed, and in the W&B config as test_shift. stored: stored_images(data)
    from before the decode cache (training images screening left out are left out here too). Read from the cache
    folder when a run on the same images, img_size and measure's code has measured it (datasets/shift_cache.py):
    every sweep trial and fold after the first spares the measure."""
    if not data.test_items or (cfg.aug_preset != "auto" and cfg.val_noise != "auto"):
        if cfg.aug_preset == "auto":
            print("aug_preset auto: no test set to measure, so the `light` preset")
        return None
    kept = set(data.ids)
    train_items = [item for item, i in zip(stored[0], stored[1]) if i in kept]
    start = time.perf_counter()
    shift, key, source = measure_cached(train_items, stored[2], cfg.img_size, native_side(stored[2]),
                                        cfg.cache_dir or None)
    took = f"cached, {key}" if source == "cached" else f"{time.perf_counter() - start:.1f}s" + (
        "" if source == "measured" else f", {source}")  # measured, but the cache folder could not keep it
    print(f"{describe_shift(shift)}\n  ({took}; aug_preset {cfg.aug_preset}, val_noise {cfg.val_noise})")
    run.update_config({"test_shift": shift})
    return shift


def load_pseudo_labels(cfg: Config, run, data, lineage_meta: dict | None) -> tuple | None:
    """--pseudo_labels: (test rows, labels) at or above --pseudo_threshold or in --pseudo_share, counted per class in
    the log, the W&B config (pseudo_label_source: file, digest, the run or ensemble that wrote it) and every
    checkpoint's lineage; the file itself is an artifact of the run."""
    if not cfg.pseudo_labels:
        return None
    rows, labels, info = read_pseudo_labels(cfg.pseudo_labels, data, cfg.pseudo_threshold, cfg.pseudo_share)
    print(f"pseudo-labels: {info['added']} of {info['test_images']} test images at p >= {cfg.pseudo_threshold}"
          f"{f' or in the top {cfg.pseudo_share:.0%} of their class' if cfg.pseudo_share else ''} "
          f"({', '.join(f'{c} {n}' for c, n in info['per_class'].items())}) from {'; '.join(info['source'])}")
    run.update_config({"pseudo_label_source": info})
    run.set_summary({"pseudo_labels/added": info["added"],
                     **{f"pseudo_labels/{c}": n for c, n in info["per_class"].items()}})
    run.use_file(Path(cfg.pseudo_labels), f"pseudo-labels-{info['sha256'][:12]}", "pseudo-labels", info)
    if lineage_meta is not None:
        lineage_meta["pseudo_labels"] = info
    return rows, labels


def final_fit_inputs(cfg: Config, run, inputs, holdout_test_probs, test_time: dict | None):
    """The final fit's FitInputs: every labelled image, the holdout's test-time decision and, with --final_pseudo
    (and no --pseudo_labels given), the holdout model's most confident test predictions per class as pseudo-labels:
    the self-training round --pseudo_labels runs/<id>/test_probs.csv would be, inside the same run. The same rows
    on every rank; printed, counted in the summary and recorded in the final checkpoints' lineage."""
    final = dataclasses.replace(inputs, final=True, test_time=test_time)
    if not cfg.final_pseudo or inputs.pseudo is not None or not inputs.data.test_items:
        return final
    pseudo = None
    if distributed.is_main() and holdout_test_probs is not None:
        rows = np.flatnonzero(select_confident(holdout_test_probs, cfg.pseudo_threshold, cfg.final_pseudo))
        pseudo = (rows, holdout_test_probs.argmax(1)[rows])
    pseudo = distributed.broadcast(pseudo)
    if pseudo is None:
        return final
    classes = inputs.data.classes
    per_class = {c: int(n) for c, n in zip(classes, np.bincount(pseudo[1], minlength=len(classes)))}
    info = {"source": ["the holdout model's test predictions"], "share": cfg.final_pseudo,
            "threshold": cfg.pseudo_threshold, "added": len(pseudo[0]), "per_class": per_class}
    print(f"final fit pseudo-labels (--final_pseudo {cfg.final_pseudo:g}): {len(pseudo[0])} of "
          f"{len(inputs.data.test_items)} test images, the holdout model's most confident per class "
          f"({', '.join(f'{c} {n}' for c, n in per_class.items())})")
    run.set_summary({"final/pseudo_labels/added": len(pseudo[0])})
    lineage_meta = None if inputs.lineage_meta is None else {**inputs.lineage_meta, "pseudo_labels": info}
    return dataclasses.replace(final, pseudo=pseudo, lineage_meta=lineage_meta)


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


def describe_shift(shift: dict) -> str:
    """The measured gap and the resolved settings, one line per operation."""
    def setting(s: dict, magnitude: bool) -> str:
        if not s["p"]:
            return "off"
        return (f"p={s['p']:.2f}" + (f" magnitude {s['magnitude']:g}" if magnitude else "")
                + (f", {s['fill']} corners" if "fill" in s else ""))

    n_train, n_test = shift["images"]
    lines = [f"test set vs training set ({n_train} / {n_test} images measured):"]
    p = shift["poses"]
    for op, what in (("turn", "turned"), ("flip", "mirrored")):
        lines.append(f"  {op:<10} {what} {p[what]:.2f} (pose classifier accuracy {p['pose_accuracy']:.2f})"
                     f" -> {setting(shift['settings'][op], False)}")
    for op, g in shift["gap"].items():
        sure = f" ± {g['share_sd']:.2f}" if g.get("share_sd") else ""  # the share's bootstrap sd over the test images
        read_as = f" (read as {g['read_as']})" if g.get("read_as") else ""  # blur or downscale: the one that fits
        if not g["share"] and g.get("explained") is not None:  # fitted, but it explains little of the difference
            read_as += f" (explains {max(0.0, g['explained']):.0%} of the difference: another operation's)"
        lines.append(f"  {op:<10} {g['statistic']} train {g['train']:.3g}, test {g['test']:.3g}, share {g['share']:.2f}"
                     f"{sure} -> {setting(shift['settings'][op], True)}{read_as}")
    return "\n".join(lines)
