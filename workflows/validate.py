"""validate.py's back office: which labelled images of --data a checkpoint is scored on, their labels in the
checkpoint's own class indices (by class name), and what the scores are written as.

Usage:
    member, part = labelled_part(resolve_member(ref, cache_dir), "/data/holdout", "auto")
    probs = member_probs(member, part.items, "auto", cache_dir)
    m = classification_metrics(part.labels, probs); print(metrics_line(part, m)); print(per_class_table(m, classes))
    write_outputs(out_dir, member, part, probs, m, steps)
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets import load_data, load_image, split_indices, take, write_csv
from utils import UserError
from utils.files import atomic_write_bytes
from utils.metrics import Predictions
from workflows.ensemble import Member, check_readable, for_test
from workflows.report import write_report

SPLITS = ("auto", "test", "val", "all")
SPLIT_HELP = (  # one line per value: the help wraps each on its own
    "which labelled images to score:\n"
    "  test: the labelled test images (test/<class>/ folders; the digits demo's test set)\n"
    "  val: the validation split the checkpoint's run held out: the data's val/ folder, else the run's seeded split "
    "rebuilt from the checkpoint's config (meaningful on the data it trained on); scored with the holdout model, not "
    "a final fit (which trained on those images), on the images as they are: the run's val_clean/* where it "
    "validated on noisy copies (--val_noise auto)\n"
    "  all: every labelled image outside test/ (train.csv's rows; the class folders, val/ included)\n"
    "  auto: test where --data has labelled test images, else val where --data is the data the checkpoint trained on "
    "or has a val/ folder, else all (a plain folder of class folders: every image in it)")


@dataclass
class Labelled:
    split: str          # test, val or all: what is scored
    why: str            # how --split auto chose it ("" when given)
    items: list         # image paths (or arrays: the digits demo)
    ids: list[str]      # each image's id as the data names it
    labels: np.ndarray  # class index per image, in the checkpoint's classes


def labelled_part(member: Member, source: str, split: str, image_col: str = "",
                  label_col: str = "") -> tuple[Member, Labelled]:
    """(the member that is scored, the labelled images) of --data. The member is what predict.py uses (a run's
    final fit where it has one), except on the val split: the holdout model. A class of the data that the checkpoint
    does not know is a UserError naming it; classes missing from the data are fine."""
    cfg = member.meta.get("config", {})
    group_col = cfg.get("group_col", "") if (Path(source) / "train.csv").is_file() else ""
    data = load_data(source, image_col or cfg.get("image_col", "ID"), label_col or cfg.get("label_col", "target"),
                     group_col)
    split, why = _choose_split(data, source, cfg) if split == "auto" else (split, "")
    if split == "test":
        if data.test_labels is None or not data.test_items:
            raise UserError(f"--data {source}: no labelled test images (test/<class>/ folders); a test set listed in "
                            f"sample_submission.csv has no labels. Use --split all or --split val")
        items, ids, labels = data.test_items, data.test_ids, data.test_labels
    elif split == "val":
        if len(member.paths) > 1:
            raise UserError(f"--split val: {member.name} is a cross-validated run ({len(member.paths)} folds), each "
                            f"fold held out its own images (its out-of-fold scores are in oof.csv); score one fold's "
                            f"checkpoint (fold<k>/best.safetensors) or use --split all")
        rows = _val_rows(data, cfg, member.name)
        items, ids, labels = take(data.items, rows), [data.ids[i] for i in rows], data.labels[rows]
    else:
        items, ids, labels = list(data.items), list(data.ids), data.labels
        if data.test_labels is not None and data.test_items:
            items, ids = items + list(data.test_items), ids + [f"test/{i}" for i in data.test_ids]
            labels = np.concatenate([labels, data.test_labels])
    labels = _to_checkpoint_classes(labels, data, member.meta, source)
    if not len(labels):
        raise UserError(f"--data {source}: no labelled images in the {split} split; nothing to score")
    check_readable(items, "labelled")
    return (member if split == "val" else for_test(member)), Labelled(split, why, items, ids, labels)


def _same_data(source: str, trained_on: str) -> bool:
    if not trained_on:
        return False
    if source == trained_on:
        return True
    return Path(source).exists() and Path(trained_on).exists() and Path(source).resolve() == Path(trained_on).resolve()


def _choose_split(data, source: str, cfg: dict) -> tuple[str, str]:
    """--split auto: (split, why), the why said on the console."""
    if data.test_labels is not None and data.test_items:
        return "test", "its labelled test images"
    if data.given_val is not None:
        return "val", "its val/ folder"
    if _same_data(source, str(cfg.get("data", ""))):
        return "val", "the data the checkpoint trained on: the validation split its run held out"
    return "all", "every labelled image: no labelled test/, no val/ folder, not the data the checkpoint trained on"


def _val_rows(data, cfg: dict, name: str) -> np.ndarray:
    """The rows the checkpoint's run validated on: the val/ folder, or its split rebuilt from its config."""
    if data.given_val is not None and not cfg.get("folds"):
        return np.flatnonzero(data.given_val)
    keys = ("val_fraction", "folds", "fold", "seed")
    if any(k not in cfg for k in keys):
        raise UserError(f"--split val: {name} records no validation split in its checkpoint ({', '.join(keys)}); "
                        f"use --split all")
    return split_indices(data.labels, data.groups, cfg["val_fraction"], cfg["folds"], cfg["fold"], cfg["seed"],
                         data.given_val)[1]


def _to_checkpoint_classes(labels: np.ndarray, data, meta: dict, source: str) -> np.ndarray:
    """The data's class indices as the checkpoint's, matched by class name (or by the label as written: a CSV's
    integer targets)."""
    known = meta["classes"]
    index = {str(t): i for i, t in enumerate(meta.get("targets", []))} | {name: i for i, name in enumerate(known)}
    present = [data.classes[i] for i in np.unique(labels)]
    unknown = [c for c in present if c not in index]
    if unknown:
        raise UserError(f"--data {source}: class(es) {', '.join(map(repr, unknown))} not among the checkpoint's "
                        f"{len(known)} classes {known}; score it on images of the classes it knows")
    mapping = np.array([index.get(c, -1) for c in data.classes], dtype=np.int64)
    return mapping[labels]


def val_steps(part: Labelled, tta: str, test_bn: str) -> tuple[str, str, list[str]]:
    """(tta, test_bn, the lines saying so): on the val split, auto is none, as the run validated; what its run
    decided for auto was decided for the test set."""
    if part.split != "val":
        return tta, test_bn, []
    lines = [f"{key} auto: none on the val split (as its run validated it; the decision its run recorded is for the "
             f"test set)" for key, value in (("test_bn", test_bn), ("tta", tta)) if value == "auto"]
    return ("none" if tta == "auto" else tta), ("none" if test_bn == "auto" else test_bn), lines


def metrics_line(member: Member, part: Labelled, m: dict) -> str:
    keys = ("acc", "f1_macro", "acsa", "auc_macro")
    scores = " | ".join(f"{part.split}/{k} {m[k]:.4f}" for k in keys)
    return (f"{member.name} ({member.meta['model']}, {member.meta['img_size']} px, {len(member.paths)} checkpoint(s)) "
            f"on {len(part.labels)} images ({part.split}) | {scores}")


def per_class_table(m: dict, classes: list[str]) -> str:
    """Precision, recall, F1, ROC-AUC and support per class, one line each (support 0: absent from the data)."""
    width = max(len("class"), *(len(c) for c in classes))
    head = f"{'class':<{width}}  precision  recall      f1     auc  support"
    rows = [f"{c:<{width}}  {m['precision'][i]:9.3f}  {m['recall'][i]:6.3f}  {m['f1'][i]:6.3f}  "
            f"{_fmt(m['auc'][i]):>6}  {int(m['support'][i]):7d}" for i, c in enumerate(classes)]
    return "\n".join([head, *rows])


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _number(value):
    """A JSON number, or null for NaN (a class without positive or negative images has no AUC)."""
    value = float(value)
    return None if math.isnan(value) else value


def write_outputs(out_dir: Path, member: Member, part: Labelled, probs: np.ndarray, m: dict, steps: list) -> list[str]:
    """val_probs.csv (id,label,pred,p_<class>...), metrics.json and report.html in out_dir; returns their names."""
    classes = member.meta["classes"]
    pred = probs.argmax(1)
    write_csv(out_dir / "val_probs.csv", ["id", "label", "pred"] + [f"p_{c}" for c in classes],
              ([i, classes[y], classes[p], *(f"{v:.6g}" for v in row)]
               for i, y, p, row in zip(part.ids, part.labels, pred, probs)))
    summary = {"member": member.name, "checkpoints": [str(p) for p in member.paths], "model": member.meta["model"],
               "split": part.split, "images": len(part.labels),
               "tta": ",".join(sorted({st.tta for st in steps})),
               "test_bn": ",".join(sorted({st.test_bn for st in steps})),
               **{k: _number(m[k]) for k in ("acc", "f1_macro", "acsa", "auc_macro")}}
    per_class = {c: {"precision": _number(m["precision"][i]), "recall": _number(m["recall"][i]),
                     "f1": _number(m["f1"][i]), "auc": _number(m["auc"][i]), "support": int(m["support"][i])}
                 for i, c in enumerate(classes)}
    doc = {**summary, "per_class": per_class, "confusion": m["confusion"].tolist()}
    atomic_write_bytes(out_dir / "metrics.json", (json.dumps(doc, indent=1) + "\n").encode())
    preds = Predictions(part.ids, lambda r: load_image(part.items[r]), part.labels, probs, classes)
    write_report(out_dir / "report.html", f"{member.name} on {part.split} images", summary, [], preds)
    return ["report.html (open it in a browser)", "val_probs.csv", "metrics.json"]
