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
