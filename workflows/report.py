"""report.html: one self-contained page per run (images inlined, no external URL) with the metrics,
their curves, the per-class scores, the confusion matrix and the misclassified gallery, for machines
where the W&B dashboard is out of reach. Open it in any browser, or copy it anywhere.

Usage: write_report(out_dir / "report.html", title, summary, history, Predictions(...), max_images)
       submit_report(cfg, run, prefix, data, s, probs)   # train.py: a fit's report, on its checkpoint writer
"""
import base64
import functools
import html
from pathlib import Path

import cv2
import numpy as np

from datasets import load_image, write_submission
from datasets.pseudo import write_probs
from utils import distributed
from utils.files import atomic_write_bytes
from utils.metrics import Predictions, classification_metrics

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{width:140px;font-size:12px;text-align:center}.card img{width:128px;height:128px;object-fit:contain;
image-rendering:pixelated;background:#000}.bad{color:#b00}.kv td:first-child{text-align:left}
"""
CHART_KEYS = ("val/f1_macro", "val/acc", "val/loss", "train/loss")


def _png(image: np.ndarray, side: int = 128) -> str:
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    _, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def _chart(history: list[dict], key: str) -> str:
    """An inline SVG line of `key` per epoch."""
    points = [(r["epoch"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and "epoch" in r]
    if len(points) < 2:
        return ""
    w, h, pad = 320, 140, 24
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: pad + (x - x0) / ((x1 - x0) or 1) * (w - 2 * pad)
    sy = lambda y: h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (f'<figure style="display:inline-block;margin:0 18px 0 0"><figcaption>{html.escape(key)} '
            f'({y0:.4g} to {y1:.4g})</figcaption><svg width="{w}" height="{h}" style="border:1px solid #ddd">'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/></svg></figure>')


def write_report(path: Path, title: str, summary: dict, history: list[dict], preds: Predictions,
                 max_images: int = 60) -> None:
    """preds: the validation set's (utils/metrics.Predictions; images(i) -> HxWx3 uint8 of sample i). The gallery:
    the most confident mistakes first."""
    classes, y_true, probs, ids, images = preds.classes, preds.y_true, preds.probs, preds.ids, preds.images
    m = classification_metrics(y_true, probs)
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:max_images]
    esc = lambda v: html.escape(str(v))
    kv = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" if isinstance(v, float) else
                 f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary.items()
                 if isinstance(v, (int, float, str)) and not k.startswith("_"))
    per_class = "".join(f"<tr><th>{esc(c)}</th><td>{m['precision'][i]:.3f}</td><td>{m['recall'][i]:.3f}</td>"
                        f"<td>{m['f1'][i]:.3f}</td><td>{m['auc'][i]:.3f}</td><td>{int(m['support'][i])}</td></tr>"
                        for i, c in enumerate(classes))
    top = max(int(m["confusion"].max()), 1)
    confusion = "".join(
        f"<tr><th>{esc(c)}</th>" + "".join(
            f'<td style="background:rgba({"31,119,180" if i == j else "214,39,40"},{n / top:.2f})">{n}</td>'
            for j, n in enumerate(row)) + "</tr>" for i, (c, row) in enumerate(zip(classes, m["confusion"])))
    gallery = "".join(
        f'<div class="card"><img alt="{esc(ids[i])}" src="{_png(images(i))}"><br>{esc(ids[i])}<br>'
        f'{esc(classes[y_true[i]])} &rarr; <span class="bad">{esc(classes[pred[i]])}</span> '
        f'({probs[i, pred[i]]:.2f})</div>'
        for i in wrong)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style></head><body>
<h1>{esc(title)}</h1>
<p>validation: {len(y_true)} images, accuracy {m['acc']:.4f}, macro-F1 {m['f1_macro']:.4f},
balanced accuracy {m['acsa']:.4f}, ROC-AUC {m['auc_macro']:.4f};
{len(np.flatnonzero(pred != y_true))} misclassified</p>
<h2>Misclassified, most confident first ({len(wrong)} shown)</h2>
<div class="gallery" id="gallery">{gallery or "<p>none</p>"}</div>
<h2>Metrics per epoch</h2>{"".join(_chart(history, k) for k in CHART_KEYS)}
<h2>Per-class scores</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>ROC-AUC</th><th>support</th></tr>
{per_class}</table>
<h2>Confusion matrix (rows: true, columns: predicted)</h2>
<table><tr><th></th>{"".join(f"<th>{esc(c)}</th>" for c in classes)}</tr>{confusion}</table>
<h2>Summary</h2><table class="kv">{kv}</table>
<script>window.addEventListener("load",()=>{{const ok=[...document.querySelectorAll("#gallery img")]
.filter(i=>i.complete&&i.naturalWidth>0).length;document.body.dataset.galleryImages=ok;}});</script>
</body></html>
"""
    atomic_write_bytes(Path(path), page.encode())


def submit_report(cfg, run, prefix: str, data, s, probs: np.ndarray) -> None:
    """report.html in the fit's folder (workflows/report.py) for the best epoch so far, written on the checkpoint
    writer's thread."""
    if not distributed.is_main():
        return
    summary = {"run": run.id, **({"fold": cfg.fold} if prefix else {}), "model": cfg.model, "img_size": cfg.img_size,
               "loss": cfg.loss, "optimizer": cfg.optimizer, "lr": cfg.lr, "epochs": cfg.epochs,
               "best_epoch": s.keeper.best_epoch, cfg.monitor: s.keeper.best_score}
    report = functools.partial(
        write_report, s.keeper.dir / "report.html", title=f"{cfg.model}, run {run.id} {prefix.rstrip('/')}",
        summary=summary, history=run.history(prefix), preds=val_predictions(data, s, probs), max_images=cfg.table_rows)
    s.keeper.writer.submit(report)


def val_predictions(data, s, probs: np.ndarray) -> Predictions:
    """The validation rows' predictions, their images as they were validated (noisy copies under --val_noise auto)."""
    return Predictions([data.ids[i] for i in s.val_idx], lambda r: load_image(s.val_images[r]),
                       data.labels[s.val_idx], probs, data.classes)


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
