"""Calibration of the test-shift measure (datasets/shift.py): random corruption recipes with known truth, applied
to test splits of two unlike image sources, measured as train.py measures them; per operation the detection rate,
the share error and the magnitude error, and the false alarms on clean test splits.

Usage (from the repository root):
    python benchmarks/shift_calibration.py                  # 36 recipes + 10 clean splits per source (~10 min, 2 cores)
    python benchmarks/shift_calibration.py --quick          # 1 recipe + 1 clean split per source, 120 images (CI)
    python benchmarks/shift_calibration.py --recipes 60 --sources documents --show   # each recipe's truth and measure
Sources: `digits` (scikit-learn's handwritten digits, white on black, 32 px like digits_hard) and `documents`
(pages rendered in code: dark text lines, rules, tables and stamps on light paper, 72 px; PIL's bundled font, so
no system font or download is needed). Each recipe switches every operation on with probability 0.45, with its
own share of the test images and its own magnitude, and stacks them in the order a scanner and an upload add
them: right-angle turns, mirrors, a small rotation (corners padded black, white or reflected, the canvas kept or
expanded), downscale-then-upscale, blur, brightness/contrast, tint, Gaussian noise, JPEG. The corruption is
applied at the source's own resolution; both splits are then measured at the training size, as measure_data does.
A magnitude is the limit each image's strength is drawn under (uniformly, from a quarter or half of it), as the
training augmentation reads it: degrees, noise std as a fraction of 255, tint grey levels, brightness and
contrast fractions, blur sigma in px, JPEG 100 - the lowest quality, downscale factor (side / shrunk side; scored
at the training size, as the measure gives it).
"""
import argparse
import io
import string
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.shift import at_size, measure_shift  # noqa: E402 - after the path

IMAGES = 300   # images per split, as many as the measure reads
OPERATIONS = {  # name: (share range, magnitude range or None, draw each image's strength from this part of it)
    "turn": ((0.3, 1.0), None, None),
    "flip": ((0.25, 0.5), None, None),
    "rotate": ((0.3, 1.0), (5.0, 30.0), 0.0),       # degrees, +-; drawn from [0, m]
    "downscale": ((0.3, 1.0), (1.5, 4.0), 0.5),     # factor; drawn from [1 + (m - 1) / 2, m]
    "blur": ((0.3, 1.0), (0.8, 3.0), 0.5),          # Gaussian sigma, px at the measured size
    "brightness": ((0.3, 1.0), (0.1, 0.4), 0.5),    # shift, fraction of 255, +-
    "contrast": ((0.3, 1.0), (0.15, 0.5), 0.5),     # factor 1 +- this
    "tint": ((0.3, 1.0), (15.0, 80.0), 0.0),        # grey levels per channel, +-
    "noise": ((0.3, 1.0), (0.03, 0.25), 0.25),      # std, fraction of 255
    "jpeg": ((0.3, 1.0), (40.0, 90.0), 0.5),        # 100 - quality
}
P_ON = 0.45


# ----------------------------------------------------------------------------- the two sources
def digits(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from sklearn.datasets import load_digits
    images = load_digits().images
    idx = rng.choice(len(images), n, replace=False)
    return [np.repeat(cv2.resize((images[i] * 255 / 16).astype(np.uint8), (32, 32),
                                 interpolation=cv2.INTER_CUBIC)[..., None], 3, -1) for i in idx]


def _words(rng, n: int) -> str:
    return " ".join("".join(rng.choice(list(string.ascii_lowercase), rng.integers(2, 9))) for _ in range(n))


def document(rng: np.random.Generator, side: int = 72) -> np.ndarray:
    """A page: light paper of a random tone, a bold title, text lines, and a table, a form's boxes or a stamp."""
    big = side * 3  # drawn large, then shrunk: antialiased strokes like a scan
    paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    img = Image.new("RGB", (big, int(big * rng.uniform(1.0, 1.4))), paper)
    draw = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    margin = int(rng.integers(8, 24))
    y = margin
    title = ImageFont.load_default(size=int(rng.integers(18, 26)))
    draw.text((margin, y), _words(rng, 2).upper(), fill=ink, font=title)
    y += 30
    kind = rng.integers(3)
    font = ImageFont.load_default(size=int(rng.integers(9, 14)))
    while y < img.height - margin - 10:
        if kind == 0 and rng.random() < 0.25:  # a table
            rows, cols = rng.integers(2, 5), rng.integers(2, 5)
            w, h = img.width - 2 * margin, 14 * rows
            for r in range(rows + 1):
                draw.line([(margin, y + 14 * r), (margin + w, y + 14 * r)], fill=ink, width=2)
            for c in range(cols + 1):
                draw.line([(margin + w * c // cols, y), (margin + w * c // cols, y + h)], fill=ink, width=2)
            y += h + 10
        elif kind == 1 and rng.random() < 0.3:  # a form's box
            draw.rectangle([margin, y, img.width - margin, y + 22], outline=ink, width=2)
            draw.text((margin + 4, y + 5), _words(rng, 2), fill=ink, font=font)
            y += 30
        else:
            draw.text((margin + int(rng.integers(0, 10)), y), _words(rng, int(rng.integers(2, 6))), fill=ink, font=font)
            y += int(rng.integers(14, 20))
    if kind == 2 or rng.random() < 0.3:  # a coloured stamp or logo
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(30, img.width - 30)), int(rng.integers(30, img.height - 30))
        r = int(rng.integers(12, 30))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=4)
    return cv2.resize(np.asarray(img), (side, side), interpolation=cv2.INTER_AREA)


def documents(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [document(rng) for _ in range(n)]


SOURCES = {"digits": (digits, 64), "documents": (documents, 64)}  # generator, the training size it is measured at


# ----------------------------------------------------------------------------- recipes with known truth
def random_recipe(rng: np.random.Generator) -> dict:
    """{operation: {"share", "magnitude"[, "border", "expand"]}} for the operations switched on (at least one)."""
    recipe = {}
    while not recipe:
        for op, (shares, magnitudes, _) in OPERATIONS.items():
            if rng.random() < P_ON:
                recipe[op] = {"share": round(float(rng.uniform(*shares)), 2)}
                if magnitudes:
                    recipe[op]["magnitude"] = round(float(rng.uniform(*magnitudes)), 3)
                if op == "rotate":
                    recipe[op] |= {"border": str(rng.choice(["black", "white", "reflect"])),
                                   "expand": bool(rng.random() < 0.5)}
    return recipe


def _strength(op: str, truth: dict, rng) -> float:
    m, low = truth["magnitude"], OPERATIONS[op][2]
    return float(rng.uniform(1 + (m - 1) * low, m) if op == "downscale" else rng.uniform(m * low, m))


def _rotate(x: np.ndarray, angle: float, border: str, expand: bool) -> np.ndarray:
    h, w = x.shape[:2]
    scale = 1.0 / (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle)))) if expand else 1.0
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    mode = cv2.BORDER_REFLECT_101 if border == "reflect" else cv2.BORDER_CONSTANT
    return cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=mode,
                          borderValue=(255, 255, 255) if border == "white" else (0, 0, 0))


def apply_op(op: str, x: np.ndarray, truth: dict, rng: np.random.Generator, scale: float) -> np.ndarray:
    """One operation at a strength drawn under the recipe's magnitude; x uint8 HxWx3 at the source's resolution,
    scale = the training size / that resolution (blur's sigma is given at the training size)."""
    if op == "turn":
        return np.ascontiguousarray(np.rot90(x, int(rng.integers(1, 4))))
    if op == "flip":
        return np.ascontiguousarray(x[:, ::-1])
    s = _strength(op, truth, rng) if "magnitude" in truth else 0.0
    h, w = x.shape[:2]
    f = x.astype(np.float32)
    if op == "rotate":
        return _rotate(x, s * rng.choice([-1, 1]), truth["border"], truth["expand"])
    if op == "downscale":
        small = cv2.resize(x, (max(2, round(w / s)), max(2, round(h / s))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if op == "blur":
        return cv2.GaussianBlur(x, (0, 0), max(0.1, s / scale))
    if op == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(x).save(buffer, "JPEG", quality=int(round(100 - s)))
        return np.asarray(Image.open(buffer).convert("RGB"))
    if op == "brightness":
        f = f + s * rng.choice([-1, 1]) * 255
    elif op == "contrast":
        f = (f - f.mean()) * (1 + s * rng.choice([-1, 1])) + f.mean()
    elif op == "tint":
        f = f + rng.uniform(-truth["magnitude"], truth["magnitude"], 3)
    elif op == "noise":
        f = f + rng.normal(0, s * 255, f.shape)
    return np.clip(f, 0, 255).astype(np.uint8)


def corrupt_split(images: list, recipe: dict, rng: np.random.Generator, scale: float) -> list[np.ndarray]:
    out = []
    for x in images:
        for op in OPERATIONS:  # the scanner's and upload's order
            if op in recipe and rng.random() < recipe[op]["share"]:
                x = apply_op(op, x, recipe[op], rng, scale)
        out.append(x)
    return out


# ----------------------------------------------------------------------------- measure and score
def measured(shift: dict) -> dict:
    """{operation: (share, magnitude or None)} as the measure reports them; share 0 = not detected."""
    s, poses = shift["settings"], shift["poses"]
    out = {"turn": (poses["turned"] if s["turn"]["p"] else 0.0, None),
           "flip": (poses["mirrored"] if s["flip"]["p"] else 0.0, None)}
    for op in OPERATIONS:
        if op in s and op not in out:
            out[op] = (s[op]["p"], s[op].get("magnitude") if s[op]["p"] else None)
    return out


def score_recipe(recipe: dict, found: dict, scale: float = 1.0) -> dict:
    """Per operation present: detected, share error, relative magnitude error; per operation absent: a false alarm.
    scale: the training size / the source's resolution (the measure gives a downscale's factor at the training size:
    a factor 3 on 32 px images stretched to 64 is a factor 6 there)."""
    rows = {}
    for op in OPERATIONS:
        share, magnitude = found.get(op, (0.0, None))
        if op not in recipe:
            rows[op] = {"present": False, "alarm": share > 0}
            continue
        truth = recipe[op]
        row = {"present": True, "detected": share > 0, "share_error": abs(share - truth["share"])}
        if "magnitude" in truth:
            true = truth["magnitude"] * (scale if op == "downscale" else 1.0)
            row["magnitude_error"] = abs((magnitude or 0.0) - true) / true
        rows[op] = row
    return rows


def run_source(name: str, n_recipes: int, n_clean: int, seed: int, show: bool, n: int = IMAGES) -> tuple[list, list]:
    """(per recipe its score_recipe rows, per clean split its rows): n training images, test splits of n drawn
    from 2 n others."""
    make, size = SOURCES[name]
    rng = np.random.default_rng(seed)
    pool = make(n * 3, rng)
    native = pool[0].shape[0]
    train_native = pool[:n]
    train = [at_size(x, size) for x in train_native]
    tests = pool[n:]
    scored, alarms = [], []
    for k in range(n_recipes + n_clean):
        part = [tests[i] for i in rng.choice(len(tests), n, replace=False)]
        recipe = random_recipe(rng) if k < n_recipes else {}
        test_native = corrupt_split(part, recipe, rng, size / native)
        test = [at_size(x, size) for x in test_native]
        found = measured(measure_shift(train, test, native, native=(train_native, test_native)))
        rows = score_recipe(recipe, found, size / native)
        (scored if recipe else alarms).append(rows)
        if show:
            print(f"{name} {'recipe ' + str(k) if recipe else 'clean'}: truth " +
                  ", ".join(f"{op} {t['share']:.2f}" + (f"@{t['magnitude']:g}" if "magnitude" in t else "")
                            for op, t in recipe.items()) + "\n  measured " +
                  ", ".join(f"{op} {s:.2f}" + (f"@{m:g}" if m else "") for op, (s, m) in found.items() if s),
                  flush=True)
    return scored, alarms


def table(scored: list, alarms: list, title: str) -> str:
    """Per operation: recipes with it, detected, share error (median, share <= 0.10), magnitude error (median,
    within 30 %), the calibrated rate (all three), false alarms where absent; then clean splits with any alarm."""
    lines = [f"{title}", "| operation | recipes with it | detected | share error median / <= 0.10 | "
             "magnitude error median / within 30 % | calibrated | false alarms where absent |",
             "|---|---|---|---|---|---|---|"]
    for op in OPERATIONS:
        present = [r[op] for r in scored if r[op]["present"]]
        absent = [r[op] for r in scored if not r[op]["present"]] + [r[op] for r in alarms]
        if not present:
            continue
        det = np.mean([r["detected"] for r in present])
        share = np.array([r["share_error"] for r in present])
        mags = np.array([r["magnitude_error"] for r in present if "magnitude_error" in r])
        good = [r["detected"] and r["share_error"] <= 0.10 and r.get("magnitude_error", 0) <= 0.30 for r in present]
        mag = f"{np.median(mags):.2f} / {np.mean(mags <= 0.30):.0%}" if len(mags) else "-"
        lines.append(f"| {op} | {len(present)} | {det:.0%} | {np.median(share):.2f} / {np.mean(share <= 0.10):.0%} | "
                     f"{mag} | {np.mean(good):.0%} | {np.mean([r['alarm'] for r in absent]):.0%} |")
    clean = [any(r[op]["alarm"] for op in OPERATIONS) for r in alarms]
    recipes_ok = [all(r[op]["detected"] and r[op]["share_error"] <= 0.10 and r[op].get("magnitude_error", 0) <= 0.30
                      for op in OPERATIONS if r[op]["present"]) for r in scored]
    lines.append(f"recipes with every operation calibrated: {np.mean(recipes_ok):.0%} of {len(scored)}; "
                 f"clean splits with a false alarm: {np.mean(clean) if clean else 0:.0%} of {len(clean)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 recipe and 1 clean split per source, 120 images")
    parser.add_argument("--images", type=int, default=IMAGES, help="images in the training and in each test split")
    parser.add_argument("--recipes", type=int, default=36, help="random recipes per source")
    parser.add_argument("--clean", type=int, default=10, help="clean test splits per source (false alarms)")
    parser.add_argument("--sources", nargs="*", default=list(SOURCES), choices=list(SOURCES),
                        help="the image sources the test splits are drawn from")
    parser.add_argument("--seed", type=int, default=0, help="draws the recipes and the splits")
    parser.add_argument("--show", action="store_true", help="print each recipe's truth and what was measured")
    args = parser.parse_args(argv)
    n_recipes, n_clean, n = (1, 1, 120) if args.quick else (args.recipes, args.clean, args.images)
    start = time.perf_counter()
    everything, every_alarm = [], []
    for name in args.sources:
        scored, alarms = run_source(name, n_recipes, n_clean, args.seed, args.show, n)
        print(table(scored, alarms, f"\n{name}: {n_recipes} recipe{'s' * (n_recipes != 1)}, "
                                           f"{n_clean} clean split{'s' * (n_clean != 1)}"), flush=True)
        everything += scored
        every_alarm += alarms
    if len(args.sources) > 1:
        print(table(everything, every_alarm, "\nall sources"))
    print(f"({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
