"""A second hard benchmark, unlike the digits: document pages of 8 kinds, rendered in code (PIL's bundled font, no
download), a small imbalanced clean training set and a balanced test set about twice its size that was scanned
badly: every page turned by a right angle, most tilted by a few degrees on white, half mirrored, all tinted and
noised at varied strengths, some blurred, downscaled or JPEG-compressed.

Usage (from the repository root):
    python benchmarks/documents.py --export /tmp/docs        # a competition folder (CSV layout); its test labels go
                                                             # to /tmp/docs.answers.csv, beside it
    python train.py --data /tmp/docs --epochs 12
    python -m datasets.digits --score runs/<id>/submission.csv --answers /tmp/docs.answers.csv
    python benchmarks/hard.py --data documents               # the results table on it
The kinds differ in layout, as document classes do (RVL-CDIP's letter, form, table, receipt, ...): the text itself
is random letters. The same seed gives the same folder.
"""
import argparse
import string
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KINDS = ["letter", "table", "form", "receipt", "invoice", "article", "certificate", "notice"]
TRAIN = [110, 85, 65, 50, 40, 30, 24, 18]  # training pages per kind, in a shuffled kind order: 422
TEST_PER_KIND = 100                        # balanced test set: 800 pages
SIDE = 72                                  # px: small scans, like the competition-like set
SEED = 2027


def _words(rng, n: int) -> str:
    return " ".join("".join(rng.choice(list(string.ascii_lowercase), rng.integers(2, 9))) for _ in range(n))


def _lines(draw, rng, pen: tuple, x0: int, y: int, y1: int, gap=(14, 20), words=(2, 6)) -> int:
    """Lines of random words from (x0, y) down to y1; pen: (font, ink)."""
    font, ink = pen
    while y < y1:
        text = _words(rng, int(rng.integers(*words)))
        draw.text((x0 + int(rng.integers(0, 8)), y), text, fill=ink, font=font)
        y += int(rng.integers(*gap))
    return y


def _table(draw, x0: int, x1: int, y: int, rows: int, cols: int, ink, row_h: int = 14) -> int:
    for r in range(rows + 1):
        draw.line([(x0, y + row_h * r), (x1, y + row_h * r)], fill=ink, width=2)
    for c in range(cols + 1):
        x = x0 + (x1 - x0) * c // cols
        draw.line([(x, y), (x, y + row_h * rows)], fill=ink, width=2)
    return y + row_h * rows


def page(kind: str, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """One page of `kind`, drawn 3x larger and shrunk (antialiased strokes like a scan), RGB uint8 side x side."""
    big = side * 3
    paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    img = Image.new("RGB", (big, big), paper)
    draw = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    m = int(rng.integers(8, 20))
    font = ImageFont.load_default(size=int(rng.integers(9, 13)))
    title = ImageFont.load_default(size=int(rng.integers(18, 26)))
    if kind == "letter":  # a small header at the left, a date at the right, long lines, a signature
        draw.text((m, m), _words(rng, 2), fill=ink, font=font)
        draw.text((big - m - 60, m + 16), _words(rng, 1), fill=ink, font=font)
        y = _lines(draw, rng, (font, ink), m, m + 50, big - 50, words=(5, 9))
        draw.line([(m, y + 12), (m + 60, y + 4)], fill=ink, width=2)
    elif kind == "table":  # a title, then one big grid
        draw.text((m, m), _words(rng, 2).upper(), fill=ink, font=title)
        _table(draw, m, big - m, m + 34, int(rng.integers(6, 11)), int(rng.integers(3, 6)), ink,
               row_h=int(rng.integers(14, 18)))
    elif kind == "form":  # labelled boxes, stacked
        y = m
        while y < big - 40:
            draw.text((m, y), _words(rng, 1), fill=ink, font=font)
            draw.rectangle([m + 50, y - 2, big - m, y + 20], outline=ink, width=2)
            y += int(rng.integers(28, 36))
    elif kind == "receipt":  # a narrow centred column of short lines with amounts, a total rule
        x0, x1 = big // 2 - int(rng.integers(35, 50)), big // 2 + int(rng.integers(35, 50))
        draw.rectangle([x0 - 6, m - 4, x1 + 6, big - m], outline=ink, width=1)
        y = m
        while y < big - 50:
            draw.text((x0, y), _words(rng, 1)[:6], fill=ink, font=font)
            draw.text((x1 - 24, y), f"{rng.integers(1, 99)}.{rng.integers(10, 99)}", fill=ink, font=font)
            y += 14
        draw.line([(x0, y + 4), (x1, y + 4)], fill=ink, width=3)
    elif kind == "invoice":  # a filled header bar, a few lines, a table at the bottom
        draw.rectangle([0, 0, big, int(rng.integers(28, 40))], fill=ink)
        y = _lines(draw, rng, (font, ink), m, 48, 100)
        _table(draw, m, big - m, y + 8, int(rng.integers(3, 5)), 4, ink)
    elif kind == "article":  # a title across, then two columns of text
        draw.text((m, m), _words(rng, 3), fill=ink, font=title)
        mid = big // 2
        _lines(draw, rng, (font, ink), m, m + 36, big - m - 10, gap=(12, 15), words=(2, 4))
        _lines(draw, rng, (font, ink), mid + 6, m + 36, big - m - 10, gap=(12, 15), words=(2, 4))
    elif kind == "certificate":  # a double frame, a centred title, a seal
        draw.rectangle([m, m, big - m, big - m], outline=ink, width=3)
        draw.rectangle([m + 6, m + 6, big - m - 6, big - m - 6], outline=ink, width=1)
        draw.text((big // 2 - 50, big // 3), _words(rng, 2).upper(), fill=ink, font=title)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy, r = big // 2 + int(rng.integers(-30, 30)), big - m - 40, int(rng.integers(14, 24))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=5)
    else:  # notice: a few very large lines
        y = m + int(rng.integers(0, 30))
        for _ in range(int(rng.integers(2, 4))):
            draw.text((m, y), _words(rng, 1).upper(), fill=ink, font=ImageFont.load_default(size=34))
            y += 48
    return cv2.resize(np.asarray(img), (side, side), interpolation=cv2.INTER_AREA)


def scan_corruption() -> A.Compose:
    """The test set's bad scan: a right-angle turn always, a small tilt on white, mirrors, tint and noise always at
    varied strengths, blur, downscaling and JPEG in some."""
    return A.Compose([
        A.RandomRotate90(p=1.0),
        A.Affine(rotate=(-15, 15), border_mode=cv2.BORDER_CONSTANT, fill=255, p=0.8),
        A.HorizontalFlip(p=0.5),
        A.GaussianBlur(sigma_limit=(0.5, 1.5), p=0.4),
        A.Downscale(scale_range=(0.4, 0.7), p=0.25),
        A.RGBShift(r_shift_limit=40, g_shift_limit=40, b_shift_limit=40, p=1.0),
        A.GaussNoise(std_range=(0.03, 0.15), p=1.0),
        A.ImageCompression(quality_range=(40, 85), p=0.3),
    ], seed=SEED)


def export(folder: Path, seed: int = SEED) -> Path:
    """The benchmark as a competition folder: train.csv (ID,target) + train/*.png, sample_submission.csv + test/*.png;
    the test labels in FOLDER.answers.csv beside it."""
    from datasets.files import write_csv
    rng = np.random.default_rng(seed)
    counts = dict(zip(rng.permutation(KINDS), TRAIN))
    noise = scan_corruption()
    folder = Path(folder)
    rows = {"train": [], "test": []}
    for kind in KINDS:
        rows["train"] += [(page(kind, rng), kind) for _ in range(counts[kind])]
        rows["test"] += [(noise(image=page(kind, rng))["image"], kind) for _ in range(TEST_PER_KIND)]
    order = rng.permutation(len(rows["test"]))  # test ids say nothing of the kind
    rows["test"] = [rows["test"][i] for i in order]
    ids = {split: [f"{split[:2]}_{n:04d}.png" for n in range(len(r))] for split, r in rows.items()}
    for split, items in rows.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for (image, _), sample_id in zip(items, ids[split]):
            cv2.imwrite(str(folder / split / sample_id), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    write_csv(folder / "train.csv", ["ID", "target"], zip(ids["train"], (k for _, k in rows["train"])))
    write_csv(folder / "sample_submission.csv", ["ID", "target"], ([i, KINDS[0]] for i in ids["test"]))
    write_csv(folder.with_name(folder.name + ".answers.csv"), ["ID", "target"],
              zip(ids["test"], (k for _, k in rows["test"])))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="folder to write the competition folder to")
    parser.add_argument("--seed", type=int, default=SEED, help="pages and test noise; the default is the benchmark's")
    args = parser.parse_args(argv)
    folder = export(Path(args.export), args.seed)
    print(f"wrote {folder} ({sum(TRAIN)} training pages, {TEST_PER_KIND * len(KINDS)} test pages) and "
          f"{folder.with_name(folder.name + '.answers.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
