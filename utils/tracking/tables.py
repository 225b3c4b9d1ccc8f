"""W&B tables and media of a run's predictions: thumbnails, the prediction and misclassified tables, the most
confused pairs. Called on the run's writer thread (utils/tracking/run.py). Usage:
    table = tables.prediction_table(rows, ids, thumb, y_true, probs, classes)
"""
import numpy as np
import wandb

THUMB_PX = 128  # longest side of table thumbnails


def thumb(image: np.ndarray, caption: str = ""):
    h, w = image.shape[:2]
    if max(h, w) > THUMB_PX:
        import cv2
        scale = THUMB_PX / max(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return wandb.Image(image, caption=caption)


def prediction_table(rows: np.ndarray, ids, images, y_true, probs, classes):
    """images(r) -> the row's wandb.Image (one per sample, shared by the tables of one call)."""
    columns = ["id", "image", "true", "pred", "confidence", "correct"] + [f"p_{c}" for c in classes]
    table = wandb.Table(columns=columns)
    pred = probs.argmax(1)
    for r in rows:
        t, p = int(y_true[r]), int(pred[r])
        table.add_data(str(ids[r]), images(r), classes[t], classes[p], float(probs[r, p]), bool(t == p),
                       *map(float, probs[r]))
    return table


def confused_pairs(y_true, probs, classes, confusion: np.ndarray, thumb, top: int = 10, examples: int = 4):
    """The most frequent (true, predicted) mistakes, each with its most confident examples."""
    pred = probs.argmax(1)
    pairs = sorted(((int(confusion[t, p]), t, p) for t, p in zip(*np.nonzero(confusion)) if t != p),
                   key=lambda c: (-c[0], c[1], c[2]))[:top]
    examples_columns = [f"example_{k}" for k in range(1, examples + 1)]
    table = wandb.Table(columns=["true", "predicted", "count", "share_of_true", *examples_columns])
    for n, t, p in pairs:
        rows = np.flatnonzero((y_true == t) & (pred == p))
        rows = rows[np.argsort(-probs[rows, p], kind="stable")][:examples]
        table.add_data(classes[t], classes[p], n, n / int(confusion[t].sum()),
                       *[thumb(r) for r in rows], *[None] * (examples - len(rows)))
    return table


def confusion_matrix(y_true: np.ndarray, pred: np.ndarray, classes: list, confusion: np.ndarray):
    """(wandb.plot.confusion_matrix, note): W&B's chart has a row per pair of classes and W&B keeps
    wandb.Table.MAX_ROWS rows of a table, so above sqrt(MAX_ROWS) classes (100) it gets the most confused classes
    (the most mistakes made on them or into them, then the most images), the samples between them, and a note
    saying so ("" when every class fits). report.html keeps the whole matrix."""
    keep = int(np.sqrt(wandb.Table.MAX_ROWS))
    note = ""
    if len(classes) > keep:
        mistakes = confusion.sum(0) + confusion.sum(1) - 2 * np.diag(confusion)
        chosen = np.lexsort((-confusion.sum(1), -mistakes))[:keep]
        index = np.full(len(classes), -1)
        index[np.sort(chosen)] = np.arange(keep)
        inside = (index[y_true] >= 0) & (index[pred] >= 0)
        y_true, pred, classes = index[y_true[inside]], index[pred[inside]], [classes[i] for i in np.sort(chosen)]
        note = (f"the {keep} most confused of {len(confusion)} classes ({int(inside.sum()):,} of {len(inside):,} "
                f"images; W&B keeps {wandb.Table.MAX_ROWS:,} rows of a table, one per pair of classes)")
    return wandb.plot.confusion_matrix(y_true=np.asarray(y_true).tolist(), preds=np.asarray(pred).tolist(),
                                       class_names=list(classes)), note
