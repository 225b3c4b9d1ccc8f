"""report.html: one self-contained page per run (images inlined as PNG, charts as inline SVG, no external URL, no
JavaScript library) for machines where the W&B dashboard is out of reach: the headline metrics and summary, the
curves per epoch (losses, validation scores, lr), the confusion matrix and per-class scores, the test set's predicted
class mix and least certain images, and the misclassified gallery. Open it in any browser, or copy it anywhere.

Usage: write_report(out_dir / "report.html", title, summary, history, Predictions(...), max_images,
                    test=TestPredictions(ids, images, probs, train_prior))   # test: optional
       submit_report(cfg, run, prefix, data, s, probs, test_probs)   # train.py: a fit's report, on its checkpoint
                                                                    # writer (test_probs optional)
"""
import base64
import functools
import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from datasets import load_image, write_submission
from datasets.pseudo import write_probs
from utils import distributed
from utils.files import atomic_write_bytes
from utils.metrics import Predictions, classification_metrics
from workflows.report_charts import line_chart

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff;max-width:1480px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}h3{font-size:15px;margin-top:18px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{width:140px;font-size:12px;text-align:center}.card img{width:128px;height:128px;object-fit:contain;
image-rendering:pixelated;background:#000}.bad{color:#b00}.kv td:first-child{text-align:left}
.chart{display:inline-block;margin:0 18px 12px 0}.chart figcaption{font-weight:600;font-size:14px}
.bar{display:block;height:7px;margin:1px 0}.train{background:#999}.test{background:#1f77b4}td.bars{width:160px}
"""
# (title, value axis, the history keys drawn together): losses overlaid, validation scores overlaid, lr alone
CHARTS = (("loss", "loss", ("train/loss", "val/loss")),
          ("scores", "score", ("val/f1_macro", "val/acc", "val_clean/f1_macro")),
          ("lr", "learning rate", ("lr",)))
UNCERTAIN_CARDS = 40  # the least certain test images shown
MIX_FLAG = 2.0  # a class whose predicted test share is this many times its training share (or 1/this) is flagged
esc = lambda v: html.escape(str(v))


@dataclass
class TestPredictions:
    """The test set's predictions, for report.html's test section: no labels, so its predicted class mix against
    the training prior and the images the model is least sure of."""
    __test__ = False  # not a pytest class
    ids: list  # each test image's id
    images: Callable  # images(i) -> HxWx3 uint8, decoded only when shown
    probs: np.ndarray  # test images x classes
    train_prior: np.ndarray  # each class's share of the training labels (sums to 1)


def _png(image: np.ndarray, side: int = 128) -> str:
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    _, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def series(history: list[dict], key: str) -> list[tuple[int, float]]:
    """(epoch, value) of `key` in the history rows, by epoch; a resumed run's repeated epoch: its last value."""
    by_epoch = {}
    for row in history:
        value = row.get(key)
        if "epoch" in row and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            by_epoch[row["epoch"]] = float(value)
    return sorted(by_epoch.items())


def class_mix(probs: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each class's share of the test set's top-1 predictions, and that share over its training share (nan where
    the class has no training image)."""
    share = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / max(len(probs), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return share, np.where(prior > 0, share / np.where(prior > 0, prior, 1), np.nan)


def least_certain(probs: np.ndarray, count: int) -> np.ndarray:
    """The rows with the smallest margin between their top-1 and top-2 probabilities, smallest first."""
    top = -np.sort(-probs, axis=1)
    margin = top[:, 0] - (top[:, 1] if probs.shape[1] > 1 else 0)
    return np.argsort(margin, kind="stable")[:count]


def _headline(m: dict, n_images: int, n_wrong: int, summary: dict) -> str:
    kv = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else
                 f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary.items()
                 if isinstance(v, int | float | str) and not k.startswith("_"))
    return (f'<section id="summary"><p>validation: {n_images} images, accuracy {m["acc"]:.4f}, macro-F1 '
            f'{m["f1_macro"]:.4f}, balanced accuracy {m["acsa"]:.4f}, ROC-AUC {m["auc_macro"]:.4f}; {n_wrong} '
            f'misclassified</p><table class="kv">{kv}</table></section>')


def _curves(history: list[dict]) -> str:
    charts = "".join(line_chart(title, {k: series(history, k) for k in keys}, y_label)
                     for title, y_label, keys in CHARTS)
    return f'<section id="curves"><h2>Metrics per epoch</h2>{charts}</section>' if charts else ""


def _scores(classes: list, m: dict) -> str:
    """The confusion matrix (cells shaded by count: blue right, red wrong), then the per-class scores."""
    top = max(int(m["confusion"].max()), 1)
    confusion = "".join(
        f"<tr><th>{esc(c)}</th>" + "".join(
            f'<td style="background:rgba({"31,119,180" if i == j else "214,39,40"},{n / top:.2f})'
            f'{";color:#fff" if n / top > 0.55 else ""}">{n}</td>'
            for j, n in enumerate(row)) + "</tr>" for i, (c, row) in enumerate(zip(classes, m["confusion"])))
    per_class = "".join(f"<tr><th>{esc(c)}</th><td>{m['precision'][i]:.3f}</td><td>{m['recall'][i]:.3f}</td>"
                        f"<td>{m['f1'][i]:.3f}</td><td>{m['auc'][i]:.3f}</td><td>{int(m['support'][i])}</td></tr>"
                        for i, c in enumerate(classes))
    return (f'<section id="confusion"><h2>Confusion matrix (rows: true, columns: predicted)</h2>'
            f'<table><tr><th></th>{"".join(f"<th>{esc(c)}</th>" for c in classes)}</tr>{confusion}</table></section>'
            f'<section id="per-class"><h2>Per-class scores</h2><table><tr><th>class</th><th>precision</th>'
            f'<th>recall</th><th>F1</th><th>ROC-AUC</th><th>support</th></tr>{per_class}</table></section>')


def _class_mix(classes: list, test: TestPredictions) -> str:
    share, ratio = class_mix(test.probs, test.train_prior)
    px = 160 / max(float(share.max()), float(test.train_prior.max()), 1e-9)  # the largest share: a full bar
    rows = []
    for i, c in enumerate(classes):
        shown = f"{ratio[i]:.2f}" if np.isfinite(ratio[i]) else "-"
        flag = ("more than in training" if ratio[i] >= MIX_FLAG else "fewer than in training"
                if ratio[i] <= 1 / MIX_FLAG else "") if np.isfinite(ratio[i]) else "no training image"
        rows.append(f'<tr class="{"bad" if flag else ""}"><th>{esc(c)}</th><td>{test.train_prior[i]:.4f}</td>'
                    f'<td>{share[i]:.4f}</td><td>{shown}</td><td>{flag}</td><td class="bars">'
                    f'<span class="bar train" style="width:{px * test.train_prior[i]:.0f}px"></span>'
                    f'<span class="bar test" style="width:{px * share[i]:.0f}px"></span></td></tr>')
    return (f'<h3>Predicted class mix against the training prior</h3><p>ratio: predicted test share / training '
            f'share; flagged outside {1 / MIX_FLAG:g} to {MIX_FLAG:g} (a shifted test set, or a class the model '
            f'over- or under-predicts). Bars: grey training, blue predicted test.</p><table id="class-mix"><tr>'
            f'<th>class</th><th>train share</th><th>predicted test share</th><th>ratio</th><th>flag</th><th></th>'
            f'</tr>{"".join(rows)}</table>')


def _test_section(classes: list, test: TestPredictions) -> str:
    probs, order = test.probs, np.argsort(-test.probs, axis=1)
    shown = least_certain(probs, UNCERTAIN_CARDS)
    cards = "".join(
        f'<div class="card" data-row="{i}"><img alt="{esc(test.ids[i])}" src="{_png(test.images(i))}"><br>'
        f'{esc(test.ids[i])}<br>{esc(classes[order[i, 0]])} {probs[i, order[i, 0]]:.2f} / '
        + (f'{esc(classes[order[i, 1]])} {probs[i, order[i, 1]]:.2f}' if probs.shape[1] > 1 else "") + "</div>"
        for i in shown)
    heading = f"Test set ({len(probs)} images, as predicted; labels, if any, not used)"
    return (f'<section id="test"><h2>{heading}</h2>{_class_mix(classes, test)}'
            f'<h3>Least certain test images, smallest top-1 minus top-2 probability first ({len(shown)} shown)</h3>'
            f'<div class="gallery" id="uncertain">{cards or "<p>none</p>"}</div></section>')


def _gallery(preds: Predictions, wrong: np.ndarray) -> str:
    classes, y_true, probs, ids = preds.classes, preds.y_true, preds.probs, preds.ids
    pred = probs.argmax(1)
    cards = "".join(
        f'<div class="card"><img alt="{esc(ids[i])}" src="{_png(preds.images(i))}"><br>{esc(ids[i])}<br>'
        f'{esc(classes[y_true[i]])} &rarr; <span class="bad">{esc(classes[pred[i]])}</span> '
        f'({probs[i, pred[i]]:.2f})</div>'
        for i in wrong)
    return (f'<section id="misclassified"><h2>Misclassified, most confident first ({len(wrong)} shown)</h2>'
            f'<div class="gallery" id="gallery">{cards or "<p>none</p>"}</div></section>')


def write_report(path: Path, title: str, summary: dict, history: list[dict], preds: Predictions,
                 max_images: int = 60, *, test: TestPredictions | None = None) -> None:
    """preds: the validation set's (utils/metrics.Predictions; images(i) -> HxWx3 uint8 of sample i). test: the
    test set's, when predicted. The page reads top-down: headline and summary, curves, confusion matrix and
    per-class scores, the test set, and last the misclassified gallery (the most confident mistakes first)."""
    m = classification_metrics(preds.y_true, preds.probs)
    pred = preds.probs.argmax(1)
    wrong = np.flatnonzero(pred != preds.y_true)
    shown = wrong[np.argsort(-preds.probs[wrong, pred[wrong]], kind="stable")][:max_images]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style></head><body>
<h1>{esc(title)}</h1>
{_headline(m, len(preds.y_true), len(wrong), summary)}
{_curves(history)}
{_scores(preds.classes, m)}
{_test_section(preds.classes, test) if test is not None else ""}
{_gallery(preds, shown)}
<script>window.addEventListener("load",()=>{{const ok=[...document.querySelectorAll(".card img")]
.filter(i=>i.complete&&i.naturalWidth>0).length;document.body.dataset.galleryImages=ok;}});</script>
</body></html>
"""
    atomic_write_bytes(Path(path), page.encode())


def submit_report(cfg, run, prefix: str, data, s, probs: np.ndarray, test_probs: np.ndarray | None = None) -> None:
    """report.html in the fit's folder (workflows/report.py) for the best epoch so far, written on the checkpoint
    writer's thread; with the test set's section when test_probs (the best checkpoint's) are given."""
    if not distributed.is_main():
        return
    summary = {"run": run.id, **({"fold": cfg.fold} if prefix else {}), "model": cfg.model, "img_size": cfg.img_size,
               "loss": cfg.loss, "optimizer": cfg.optimizer, "lr": cfg.lr, "epochs": cfg.epochs,
               "best_epoch": s.keeper.best_epoch, cfg.monitor: s.keeper.best_score}
    report = functools.partial(
        write_report, s.keeper.dir / "report.html", title=f"{cfg.model}, run {run.id} {prefix.rstrip('/')}",
        summary=summary, history=run.history(prefix), preds=val_predictions(data, s, probs), max_images=cfg.table_rows,
        test=test_predictions(data, test_probs) if test_probs is not None else None)
    s.keeper.writer.submit(report)


def val_predictions(data, s, probs: np.ndarray) -> Predictions:
    """The validation rows' predictions, their images as they were validated (noisy copies under --val_noise auto)."""
    return Predictions([data.ids[i] for i in s.val_idx], lambda r: load_image(s.val_images[r]),
                       data.labels[s.val_idx], probs, data.classes)


def test_predictions(data, probs: np.ndarray) -> TestPredictions:
    """The test rows' predictions, with the training labels' class shares as the prior they are compared with."""
    prior = np.bincount(data.labels, minlength=len(data.classes)) / max(len(data.labels), 1)
    return TestPredictions(list(data.test_ids), lambda i: load_image(data.test_items[i]), probs, prior)


def write_test_outputs(out_dir: Path, data, probs: np.ndarray, source: str) -> None:
    """submission.csv, and test_probs.csv (id,source,p_<class>...) for a pseudo-label round: train.py --pseudo_labels
    out_dir/test_probs.csv."""
    write_submission(out_dir / "submission.csv", data, probs.argmax(1))
    write_probs(out_dir / "test_probs.csv", data.test_ids, probs, data.classes, source)


def where_and_next(cfg, out_dir: Path) -> str:
    """The end of a run, as Ultralytics ends one: where its results are and the commands that come next."""
    has_test = (out_dir / "submission.csv").is_file()
    saved = ["report.html (open it in a browser)", "best.safetensors"] + (["submission.csv"] if has_test else [])
    final = out_dir / "final" / "best.safetensors"
    lines = [f"results in {out_dir}/: " + ", ".join(saved)
             + (f"; the final fit's model in {final.parent}/" if final.is_file() else "")]
    if has_test:
        lines.append(f"next: python predict.py {out_dir} --data {cfg.data} (predict again, or other images); "
                     f"python ensemble.py {out_dir} runs/<other run> --data {cfg.data} (several runs)")
    return "\n".join(lines)
