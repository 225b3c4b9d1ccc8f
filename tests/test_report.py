"""report.html: every run writes one self-contained page (no external URL), valid HTML, and it renders in
headless Chromium with the curves on its first screen and every image decoded. Its parts (charts, order, the
test section) from direct write_report calls."""
import html
import re
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from conftest import TINY_MODEL, make_competition_folder, run_train
from utils.metrics import Predictions
from workflows.report import TestPredictions, write_report
from workflows.report_charts import epoch_ticks, nice_ticks

VOID = {"meta", "img", "br", "hr", "input", "link", "source", "area", "base", "col", "embed", "param", "track", "wbr"}


class TagChecker(HTMLParser):
    """Every non-void element closed, in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = make_competition_folder(root / "comp", n_train=240, n_test=60)  # a test set, more images than the 40 shown
    out = root / "out"
    run_train(["--data", data, "--model", TINY_MODEL, "--img_size", "32", "--epochs", "2", "--workers", "0",
               "--wandb_mode", "disabled", "--table_rows", "40", "--out_dir", str(out)])
    return out / "report.html"


@pytest.mark.slow
def test_report_is_valid_and_self_contained(report):
    page = report.read_text()
    checker = TagChecker()
    checker.feed(page)
    assert page.startswith("<!DOCTYPE html>") and checker.errors == [] and checker.stack == []
    assert not re.search(r"https?:|url\(|(src|href)=\"(?!data:)", page)  # nothing to fetch
    assert checker.images and all(i["src"].startswith("data:image/png;base64,") for i in checker.images)
    gallery = page[page.index('id="misclassified"'):]
    assert 0 < gallery.count("<img") <= 40 and "Per-class scores" in page and "Confusion matrix" in page
    assert _texts(_chart(page, "loss"), "xtick") == ["1", "2"] and 'data-series="lr"' in page
    # the test set: its class mix and least certain images, before the misclassified gallery
    test = page[page.index('id="test"'):page.index('id="misclassified"')]
    assert 'id="class-mix"' in test and 0 < test.count("<img") <= 40


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium package (apt install chromium)")
def test_report_renders_with_the_curves_on_screen_and_every_image_decoded(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1280,900"]
    subprocess.run([*chromium, f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*chromium, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    cards = report.read_text().count('class="card"')
    assert f'data-gallery-images="{cards}"' in dom  # every card's image (test set and mistakes) decoded
    image = cv2.imread(str(shot)).astype(int)
    assert image.shape[:2] == (900, 1280)
    # the first screen: summary and curves (the galleries come last); the first series' blue (#1f77b4) is drawn
    blue = (abs(image[..., 0] - 0xB4) < 40) & (abs(image[..., 1] - 0x77) < 40) & (abs(image[..., 2] - 0x1F) < 40)
    assert blue.sum() > 500  # ~1700 in QtWebEngine's rendering of the same page
    shutil.copy(shot, report.with_suffix(".png"))
    print(f"screenshot: {report.with_suffix('.png')}")


# ----------------------------------------------------------------------------- the page's parts, from write_report
CLASSES = ["cat", "dog", "<bird>"]  # a class name that must be escaped


def _history(epochs: int, prefix: str = "") -> list[dict]:
    """Rows as run.history(prefix) returns them: the prefix taken off, epoch and lr beside the metrics."""
    return [{"epoch": e, "lr": 0.01 / e, "train/loss": 2.0 / e, "val/loss": 2.2 / e, "val/acc": 0.3 + 0.1 * e,
             "val/f1_macro": 0.25 + 0.1 * e, "train/epoch_seconds": 1.5} for e in range(1, epochs + 1)]


def _write(tmp_path, history, test=None, n=12, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(CLASSES)), n)
    preds = Predictions([f"v{i}" for i in range(n)], lambda i: np.full((8, 8, 3), 40 * (i % 6), np.uint8),
                        np.arange(n) % len(CLASSES), probs, CLASSES)
    path = tmp_path / "report.html"
    if test is None:  # the call as label_errors.py and validate.py make it: positional, no test keyword
        write_report(path, "run <x>", {"run": "abc", "val/f1_macro": 0.5}, history, preds, 60)
    else:
        write_report(path, "run <x>", {"run": "abc", "val/f1_macro": 0.5}, history, preds, 60, test=test)
    return path.read_text()


def _chart(page: str, name: str) -> str:
    found = re.search(rf'<figure class="chart" id="chart-{name}">(.*?)</figure>', page, re.S)
    assert found, f"no {name} chart"
    return found.group(1)


def _texts(svg: str, cls: str) -> list[str]:
    return re.findall(rf'<text class="{cls}"[^>]*>([^<]*)</text>', svg)


def test_loss_chart_overlays_train_and_val_on_an_epoch_axis(tmp_path):
    page = _write(tmp_path, _history(5))
    loss = _chart(page, "loss")
    assert _texts(loss, "xtick") == ["1", "2", "3", "4", "5"] and _texts(loss, "xlabel") == ["epoch"]
    assert re.findall(r'<polyline class="series" data-series="([^"]+)"', loss) == ["train/loss", "val/loss"]
    legend = re.findall(r'<g class="legend">.*?<text[^>]*>([^<]*)</text></g>', loss)
    assert legend == ["train/loss", "val/loss"]
    y = [float(t) for t in _texts(loss, "ytick")]
    assert 4 <= len(y) <= 6 and y == sorted(y) and y[0] <= 2.2 / 5 and y[-1] >= 2.2  # the values lie within
    assert loss.count('class="grid"') == len(y)
    scores = _chart(page, "scores")
    assert re.findall(r'data-series="([^"]+)"', scores)[:2] == ["val/f1_macro", "val/acc"]
    lr = _chart(page, "lr")
    assert re.findall(r'<polyline class="series" data-series="([^"]+)"', lr) == ["lr"]
    points = re.search(r'data-series="lr"[^>]*points="([^"]+)"', lr).group(1).split()
    heights = [float(p.split(",")[1]) for p in points]
    assert len(points) == 5 and heights == sorted(heights)  # lr falls: its line goes down (SVG y grows downward)


def test_value_ticks_are_four_to_six_round_steps_over_the_range():
    rng = np.random.default_rng(0)
    ranges = [(0.31, 0.92), (0.0021, 2.2), (1e-5, 1e-3), (0.5, 0.5), (0.0, 0.0), (0, 1730), (-3, 7)]
    for lo, hi in ranges + [tuple(sorted(rng.uniform(-1, 1, 2) * 10.0 ** rng.integers(-6, 4))) for _ in range(300)]:
        ticks = nice_ticks(lo, hi)
        step = ticks[1] - ticks[0]
        assert 4 <= len(ticks) <= 6 and ticks[0] <= lo + 1e-9 * step and ticks[-1] >= hi - 1e-9 * step, (lo, hi)
        assert np.allclose(np.diff(ticks), step), (lo, hi)
        assert round(step / 10 ** np.floor(np.log10(step) + 1e-9), 6) in (1, 2, 2.5, 5), (lo, hi, step)
    assert epoch_ticks(1, 1) == [1] and epoch_ticks(1, 12) == list(range(1, 13))
    assert epoch_ticks(1, 100) == list(range(10, 101, 10))  # past 12 epochs: a round integer step


def test_a_single_epoch_still_draws_its_points(tmp_path):
    page = _write(tmp_path, _history(1))
    for name, series in [("loss", 2), ("scores", 2), ("lr", 1)]:
        chart = _chart(page, name)
        assert _texts(chart, "xtick") == ["1"]
        markers = re.findall(r'<circle class="marker" cx="([\d.]+)" cy="([\d.]+)" r="([\d.]+)"', chart)
        assert len(markers) == series and all(float(r) > 0 for *_, r in markers)
        assert all(60 < float(cx) < 460 and 30 <= float(cy) <= 220 for cx, cy, _ in markers)  # inside the plot


@pytest.mark.parametrize("lr", [1e-12, 0.0, 0.01])
def test_a_constant_or_tiny_series_is_drawn_inside_the_plot(tmp_path, lr):
    """A flat line (a constant lr, --lr 1e-12 in an early-stopping test) has no range to scale by."""
    history = [{**row, "lr": lr} for row in _history(3)]
    chart = _chart(_write(tmp_path, history), "lr")
    points = [tuple(map(float, p.split(","))) for p in re.search(r'<polyline[^>]*points="([^"]+)"', chart)[1].split()]
    assert len(points) == 3 and all(60 < x < 460 and 30 <= y <= 220 for x, y in points)


def test_prefixed_keys_and_repeated_epochs(tmp_path):
    """submit_report passes run.history("fold0/"): the keys arrive without the prefix; a resumed epoch logged twice
    counts once, its last value."""
    history = _history(3) + [{"epoch": 3, "train/loss": 0.1, "val/loss": 0.2}, {"fold": 1, "cv/val/f1_macro": 0.5}]
    loss = _chart(_write(tmp_path, history), "loss")
    assert _texts(loss, "xtick") == ["1", "2", "3"]
    assert len(re.search(r'data-series="train/loss"[^>]*points="([^"]+)"', loss).group(1).split()) == 3
    assert "0.1" in re.findall(r"<title>train/loss epoch 3: ([^<]*)</title>", loss)


def test_no_history_no_curves(tmp_path):
    page = _write(tmp_path, [])  # label_errors.py's out-of-fold report
    assert 'id="curves"' not in page and 'id="confusion"' in page


def _test_set(n=30, seed=1):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(CLASSES)) * 0.7, n)
    return TestPredictions([f"t<{i}>" for i in range(n)], lambda i: np.full((8, 8, 3), 200, np.uint8), probs,
                           np.array([0.6, 0.3, 0.1]))


def test_sections_read_top_down_and_the_gallery_comes_last(tmp_path):
    page = _write(tmp_path, _history(3), test=_test_set())
    order = [page.index(f'id="{s}"') for s in ("summary", "curves", "confusion", "per-class", "test", "misclassified")]
    assert order == sorted(order) and page.index("<h1>") < order[0]
    assert page.index('id="summary"') < page.index("val/f1_macro</td>") < page.index('id="curves"')  # summary table
    assert "&lt;bird&gt;" in page and "<bird>" not in page and "t&lt;3&gt;" in page  # names and ids escaped
    checker = TagChecker()
    checker.feed(page)
    assert checker.errors == [] and checker.stack == []
    assert not re.search(r"https?:|url\(|(src|href)=\"(?!data:)", page)


def test_without_test_predictions_no_test_section(tmp_path):
    assert 'id="test"' not in _write(tmp_path, _history(2))


def test_class_mix_is_the_predicted_share_against_the_prior(tmp_path):
    test = _test_set()
    page = _write(tmp_path, _history(2), test=test)
    table = re.search(r'<table id="class-mix">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr[^>]*><th>([^<]*)</th><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>",
                      table)
    share = np.bincount(test.probs.argmax(1), minlength=3) / len(test.probs)
    assert [r[0] for r in rows] == ["cat", "dog", "&lt;bird&gt;"]
    for (_, prior, predicted, ratio, flag), p, s in zip(rows, test.train_prior, share):
        assert float(prior) == pytest.approx(p, abs=1e-4) and float(predicted) == pytest.approx(s, abs=1e-4)
        assert float(ratio) == pytest.approx(s / p, abs=0.006)
        assert bool(flag) == (s / p >= 2 or s / p <= 0.5)
    assert any(r[4] for r in rows)  # this draw's mix is far from the prior: some class is flagged


def test_the_least_certain_test_images_are_the_smallest_margins(tmp_path):
    test = _test_set(n=60)
    page = _write(tmp_path, _history(2), test=test)
    cards = re.search(r'<div class="gallery" id="uncertain">(.*?)</div></section>', page, re.S).group(1)
    shown = [int(i) for i in re.findall(r'<div class="card" data-row="(\d+)">', cards)]
    top = -np.sort(-test.probs, axis=1)
    margin = top[:, 0] - top[:, 1]
    assert len(shown) == 40 and sorted(shown) == sorted(np.argsort(margin)[:40].tolist())
    assert margin[shown].tolist() == sorted(margin[shown].tolist())  # the smallest first
    first = re.search(r'data-row="\d+"><img[^>]*><br>([^<]*)<br>([^<]*)</div>', cards)
    i = shown[0]
    a, b = np.argsort(-test.probs[i])[:2]
    assert first.group(1) == f"t&lt;{i}&gt;"
    assert first.group(2) == f"{html.escape(CLASSES[a])} {test.probs[i, a]:.2f} / {html.escape(CLASSES[b])} " \
                             f"{test.probs[i, b]:.2f}"
