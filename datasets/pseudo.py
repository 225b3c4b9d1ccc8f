"""Test-set probabilities in and out: predict.py / ensemble.py --save_probs write them, train.py --pseudo_labels
reads them back and trains on the confident test images (pseudo-labels).

Usage:
    write_probs("probs.csv", data.test_ids, probs, data.classes, source="ensemble of a, b (run x1y2)")
    rows, labels, info = read_pseudo_labels("probs.csv", data, threshold=0.9, share=0.3)  # test rows, class index
File: id,source,p_<class>... one row per test image, the class columns in the model's class order; `source`
names the run or ensemble that produced it (lineage).
"""
import hashlib
from pathlib import Path

import numpy as np

from datasets.files import Data, read_csv, write_csv
from utils import UserError


def write_probs(path: Path, ids: list[str], probs: np.ndarray, classes: list[str], source: str) -> None:
    write_csv(Path(path), ["id", "source"] + [f"p_{c}" for c in classes],
              ([i, source, *(f"{p:.6g}" for p in row)] for i, row in zip(ids, probs)))


def select_confident(probs: np.ndarray, threshold: float, share: float) -> np.ndarray:
    """Which rows become pseudo-labels: a top probability >= threshold, or (share > 0) among the most confident
    `share` of the rows predicted as that class: class-balanced self-training (Zou et al. 2018, CBST), so a class the
    model is less sure of on a shifted test set still gets its share instead of none."""
    if not len(probs):
        return np.zeros(0, bool)
    top, pred = probs.max(1), probs.argmax(1)
    keep = top >= threshold
    if share > 0:
        for k in np.unique(pred):
            rows = np.flatnonzero(pred == k)
            take = rows[np.argsort(-top[rows], kind="stable")[:int(np.ceil(share * len(rows)))]]
            keep[take] = True
    return keep


def read_pseudo_labels(path: str, data: Data, threshold: float,
                       share: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(test rows chosen by select_confident, their predicted class, a record for the lineage).
    The file must cover this data's test ids (no others) with this data's classes, in the same order."""
    path = Path(path)
    try:
        header, rows = read_csv(path)
    except OSError as e:
        raise UserError(f"--pseudo_labels {path}: {e.strerror}") from None
    wanted = [f"p_{c}" for c in data.classes]
    columns = [h for h in header if h.startswith("p_")]
    if "id" not in header or columns != wanted:
        raise UserError(f"--pseudo_labels {path}: expected the columns id, source, {', '.join(wanted)} (this data's "
                        f"classes, in order); found {header[:12]}; write it with predict.py or ensemble.py "
                        f"--save_probs")
    if not data.test_ids:
        raise UserError(f"--pseudo_labels {path}: --data {len(data.labels)} training images but no test set to label")
    where = {i: n for n, i in enumerate(data.test_ids)}
    ids = [r["id"] for r in rows]
    unknown = [i for i in ids if i not in where]
    if unknown or len(set(ids)) != len(ids):
        what = f"{len(unknown)} id(s) are not in the test set, e.g. {unknown[:3]}" if unknown else "an id is repeated"
        raise UserError(f"--pseudo_labels {path}: {what}; the file must come from a prediction of this data's test set")
    try:
        probs = np.array([[float(r[c]) for c in wanted] for r in rows],
                         dtype=np.float64).reshape(len(rows), len(wanted))
    except ValueError as e:
        raise UserError(f"--pseudo_labels {path}: a probability is not a number ({e})") from None
    keep = select_confident(probs, threshold, share)
    test_rows = np.array([where[i] for i in ids], dtype=np.int64)[keep]
    labels = probs.argmax(1)[keep].astype(np.int64)
    info = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "threshold": threshold,
            "share": share,
            "source": sorted({r.get("source", "") for r in rows}), "test_images": len(rows), "added": int(keep.sum()),
            "per_class": {c: int((labels == k).sum()) for k, c in enumerate(data.classes)}}
    return test_rows, labels, info
