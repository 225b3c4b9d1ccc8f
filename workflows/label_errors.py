"""A --cv run's out-of-fold analysis (oof.csv, report.html) and its suspect labels (confident learning,
Northcutt et al. 2021, via cleanlab), and the edited list fed back to train.py.

Usage:
    python train.py --cv True --folds 5 ...             # writes suspect_labels.csv beside oof.csv
    # edit suspect_labels.csv: in new_label put a class name (a fix) or "exclude"; blank keeps the label
    python train.py --label_fixes runs/<id>/suspect_labels.csv ...
In code: summary = analyse_oof(cfg, run, out_dir, data, oof, folds, scores) after the folds;
         ranked = suspect_indices(labels, oof_probs); apply_label_fixes(data, path)
"""
from pathlib import Path

import numpy as np

from datasets import load_image, read_csv, write_csv, write_oof
from utils import UserError
from utils.metrics import Predictions, classification_metrics
from workflows.report import write_report

EXCLUDE = "exclude"
FIX_COLUMNS = ("id", "new_label")


def suspect_indices(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of the images whose given label confident learning finds off, least self-confident first."""
    from cleanlab.filter import find_label_issues  # late: only cross-validated runs need it
    return find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)


def write_suspects(path: Path, data, probs: np.ndarray, ranked: np.ndarray) -> None:
    """id, given, predicted, self_confidence, new_label (blank, for the user), p_<class>... per suspect."""
    header = [*FIX_COLUMNS[:1], "given", "predicted", "self_confidence", FIX_COLUMNS[1]]
    write_csv(path, header + [f"p_{c}" for c in data.classes],
              ([data.ids[i], data.classes[data.labels[i]], data.classes[probs[i].argmax()],
                f"{probs[i, data.labels[i]]:.4f}", "", *(f"{q:.4f}" for q in probs[i])] for i in ranked))


def apply_label_fixes(data, path: str) -> tuple[int, int]:
    """Relabel (new_label = a class name) or drop (new_label = exclude) training images by id, in place;
    blank rows keep their label. Returns (fixed, excluded)."""
    try:
        header, rows = read_csv(path)
    except OSError as e:
        raise UserError(f"--label_fixes {path}: {e.strerror}") from None
    missing = [c for c in FIX_COLUMNS if c not in header]
    if missing:
        raise UserError(f"--label_fixes {path}: no column(s) {missing}; columns are {header} (suspect_labels.csv has "
                        f"both: put a class name or '{EXCLUDE}' in new_label)")
    where = {sample_id: i for i, sample_id in enumerate(data.ids)}
    classes = {name: k for k, name in enumerate(data.classes)} | {str(t): k for k, t in enumerate(data.targets)}
    fixes, drop = {}, set()
    for line, row in enumerate(rows, 2):
        new = (row["new_label"] or "").strip()
        if not new:
            continue
        if row["id"] not in where:
            raise UserError(f"--label_fixes {path}, line {line}: id {row['id']!r} is not a training image")
        if new == EXCLUDE:
            drop.add(where[row["id"]])
        elif new in classes:
            fixes[where[row["id"]]] = classes[new]
        else:
            raise UserError(f"--label_fixes {path}, line {line}: new_label {new!r} is not a class {data.classes} "
                            f"nor '{EXCLUDE}'")
    for i, k in fixes.items():
        data.labels[i] = k
    if drop:
        data.drop(drop)
    return len(fixes), len(drop)


def analyse_oof(cfg, run, out_dir: Path, data, oof: np.ndarray, folds: np.ndarray, scores: list[float]) -> dict:
    """After a --cv run's folds: oof.csv (and its W&B artifact), the suspect labels (suspect_labels.csv and the
    W&B table oof/suspect_labels), the out-of-fold report.html; returns the run's summary."""
    write_oof(out_dir / "oof.csv", data, oof, folds)
    m = classification_metrics(data.labels, oof)
    run.log_artifact(out_dir / "oof.csv", f"oof-{run.id}", "oof", {"classes": data.classes, "folds": cfg.folds})
    suspects = suspect_indices(data.labels, oof)
    write_suspects(out_dir / "suspect_labels.csv", data, oof, suspects)
    run.log_table("oof/suspect_labels", ["id", "image", "given", "predicted", "self_confidence"]
                  + [f"p_{c}" for c in data.classes],
                  [[data.ids[i], load_image(data.items[i]), data.classes[data.labels[i]],
                    data.classes[oof[i].argmax()], float(oof[i, data.labels[i]]), *map(float, oof[i])]
                   for i in suspects[:cfg.table_rows]])
    write_report(out_dir / "report.html", f"{cfg.model}, run {run.id}, {cfg.folds}-fold out-of-fold predictions",
                 {"run": run.id, "model": cfg.model, "img_size": cfg.img_size, "folds": cfg.folds,
                  "scores": str(scores), cfg.monitor: float(np.mean(scores)), "suspect labels": len(suspects)},
                 [], Predictions(data.ids, lambda i: load_image(data.items[i]), data.labels, oof, data.classes),
                 cfg.table_rows)
    print(f"{len(suspects)} suspect label(s), least self-confident first, in {out_dir / 'suspect_labels.csv'}: put a "
          f"class or 'exclude' in new_label and pass it back with --label_fixes")
    summary = {cfg.monitor: float(np.mean(scores)), f"{cfg.monitor}_std": float(np.std(scores)), "cv/scores": scores,
               "oof/acc": m["acc"], "oof/f1_macro": m["f1_macro"], "oof/acsa": m["acsa"],
               "oof/auc_macro": m["auc_macro"], "oof/suspect_labels": len(suspects)}
    print(f"cv {cfg.monitor} {np.mean(scores):.4f} +- {np.std(scores):.4f} over {cfg.folds} folds | "
          f"oof/f1_macro {m['f1_macro']:.4f} | wrote {out_dir / 'oof.csv'}")
    return summary
