"""How the test images differ from the training images, and the augmentation that covers it (--aug_preset auto,
--val_noise auto).

Usage:
    shift = measure_shift(train_images, test_images)   # HxWx3 uint8 arrays, at the training size
    print(describe_shift(shift))                        # the measured gap and the resolved settings
    train_tf = AUGS.build("auto", img_size, strength, mean, std, settings=shift["settings"])
    noisy = corrupt(image, shift["settings"], seed=image_seed(sample_id))   # the same corruption every time

One statistic per corruption the write-ups saw in test sets: Gaussian noise (Immerkaer's sigma), blur
(variance of the Laplacian), small rotations (dominant gradient direction off the axes), tint (spread of
the channel means), brightness and contrast (mean and std of grey); right-angle turns and flips from a pose
classifier trained on the training images in their 8 square poses. Blur, rotation and contrast are read on
the test images without measured noise, which would hide them.
- share: the one-sided Kolmogorov-Smirnov distance between the test and training distributions of that
  statistic (a lower bound of the share of shifted test images), when significant; an operation is on when
  its share is at least MIN_SHARE, with that probability.
- magnitude: the operation is simulated on that share of the training images at growing magnitudes; the
  first at which they reach the test set's corrupted tail (its 90th percentile) bounds the operation's range.
- turns and flips: the pose classifier's predictions on the test set, unmixed through its own confusion
  matrix on held-out training images (corrupted as the test set is, so noise does not read as a pose).
Everything is seeded by SEED alone: every run and sweep trial on the same data and img_size gets the same settings.
"""
import zlib

import albumentations as A
import cv2
import numpy as np
from PIL import Image
from scipy.optimize import nnls
from sklearn.linear_model import LogisticRegression

from datasets.files import load_image
from datasets.transforms import matched_ops
from utils.image_stats import colour_cast, dominant_orientation, noise_sigma, sharpness
from utils.stop import check_stop

SAMPLE = 300       # images per split that are measured (a random, fixed subset of larger sets)
SIMULATE = 150     # training images each operation is simulated on
MIN_SHARE = 0.1    # an operation is switched on when at least this share of the test set shows it
MIN_POSE_SHARE = 0.25  # turns and flips: the pose estimate's own error on upright sets reaches ~0.15
SEED = 0
POSE_SIDE = 16     # px, the pose classifier's input (grey, standardized)

# per operation: statistic, direction ("up": larger in corrupted images, "down", "both"), magnitudes tried
# in the order they are resolved: each one is measured against training images that already carry the ones before
OPERATIONS = {
    "noise": ("noise", "up", [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4]),   # std, fraction of 255
    "tint": ("tint", "up", [5, 10, 15, 20, 30, 40, 50, 60, 80, 100]),                       # grey levels per channel
    "brightness": ("brightness", "both", [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]),            # shift, fraction of 255
    "contrast": ("contrast", "both", [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7]),           # factor 1 +- this
    "blur": ("sharpness", "down", [0.4, 0.6, 0.8, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0]),      # Gaussian sigma, px
    "rotate": ("orientation", "up", [2, 4, 6, 8, 10, 15, 20, 25, 30, 45]),                  # degrees
}
CLEAN_ONLY = {"sharpness", "orientation", "contrast"}  # read on the test images without measured noise
RESOLUTION = {"noise": 0.5, "tint": 2.0, "brightness": 2.0, "contrast": 2.0, "orientation": 1.0}  # smaller: no change
OFF = {"turn": {"p": 0.0}, "flip": {"p": 0.0}, **{op: {"p": 0.0, "magnitude": 0.0} for op in OPERATIONS}}


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


STATISTICS = {
    "noise": lambda rgb: noise_sigma(_grey(rgb)),
    "sharpness": lambda rgb: (lambda g: sharpness(g) / (float(g.var()) + 1.0))(_grey(rgb)),  # blur, not contrast
    "orientation": lambda rgb: dominant_orientation(_grey(rgb)),
    "tint": colour_cast,
    "brightness": lambda rgb: float(_grey(rgb).mean()),
    "contrast": lambda rgb: float(_grey(rgb).std()),
}


def _simulate(op: str, rgb: np.ndarray, m: float, rng: np.random.Generator, noise_scale: float = 1.0) -> np.ndarray:
    """The operation at magnitude m exactly (its sign at random), as the training augmentation applies it."""
    x = rgb.astype(np.float32)
    h, w = x.shape[:2]
    if op == "noise":  # drawn at the test images' native resolution and resized, as GaussNoise's noise_scale_factor
        small = rng.normal(0, m * 255, (max(1, int(h * noise_scale)), max(1, int(w * noise_scale)), x.shape[2]))
        x = x + cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR).reshape(x.shape)
    elif op == "blur":
        x = cv2.GaussianBlur(x, (0, 0), m)
    elif op == "rotate":
        turn = cv2.getRotationMatrix2D((w / 2, h / 2), float(m * rng.uniform(-1, 1)), 1.0)
        x = cv2.warpAffine(x, turn, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    elif op == "tint":
        x = x + rng.uniform(-m, m, 3)
    elif op == "brightness":
        x = x + rng.uniform(-m, m) * 255
    elif op == "contrast":
        x = (x - x.mean()) * (1 + rng.uniform(-m, m)) + x.mean()
    return np.clip(x, 0, 255).astype(np.uint8)


def _cdf_gaps(train: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """(largest F_train - F_test: test shifted up, largest F_test - F_train: shifted down), one-sided KS statistics."""
    grid = np.sort(np.concatenate([train, test]))
    f_train = np.searchsorted(np.sort(train), grid, side="right") / len(train)
    f_test = np.searchsorted(np.sort(test), grid, side="right") / len(test)
    return float(max(0.0, (f_train - f_test).max())), float(max(0.0, (f_test - f_train).max()))


def shifted_share(train: np.ndarray, test: np.ndarray, direction: str, resolution: float = 0.0) -> float:
    """The share of test images whose statistic is shifted in `direction`, 0 when the shift is not significant.
    If the test set mixes unchanged images with a share s of shifted ones, the one-sided KS statistic is at most
    s (and equals it when the shifted ones lie beyond the training range): a lower bound, significant beyond the
    KS test's 5% critical value. Test values are first moved toward the training values by `resolution` (in the
    statistic's unit) or a tenth of the training interquartile range, whichever is larger."""
    spread = np.subtract(*np.quantile(train, [0.75, 0.25]))
    margin = max(resolution, 0.1 * spread)  # a difference smaller than this is no corruption (clipped noise tints)
    up, down = _cdf_gaps(train, test - margin)[0], _cdf_gaps(train, test + margin)[1]
    share = {"up": up, "down": down, "both": up + down}[direction]
    critical = 1.36 * np.sqrt((len(train) + len(test)) / (len(train) * len(test))) * (1.5 if direction == "both" else 1)
    return float(min(1.0, share)) if share > critical else 0.0


def _tail(values: np.ndarray, centre: float, direction: str) -> float:
    """Where the corrupted tail lies: the 90th percentile (10th for "down"; of |deviation| for "both")."""
    if direction == "both":
        return float(np.quantile(np.abs(values - centre), 0.9))
    return float(np.quantile(values, 0.1 if direction == "down" else 0.9))


def _magnitude(op: str, stat: str, direction: str, levels: list, share: float, images: list, base: np.ndarray,
               test: np.ndarray, noise_scale: float) -> float:
    """The first magnitude at which the images (training images with the operations resolved before), this
    operation applied to a share of them, reach the test set's corrupted tail."""
    centre = float(np.median(base))
    goal = _tail(test, centre, direction)
    for m in levels:
        rng = np.random.default_rng(SEED)
        values = np.array([STATISTICS[stat](_simulate(op, img, m, rng, noise_scale) if rng.random() < share else img)
                           for img in images])
        reached = _tail(values, centre, direction)
        if (reached <= goal) if direction == "down" else (reached >= goal):
            return float(m)
    return float(levels[-1])


def _d4(gray: np.ndarray) -> list[np.ndarray]:
    """The 8 square poses: k quarter turns of the image, then of its mirror (index 4 f + k)."""
    return [np.rot90(np.fliplr(gray) if f else gray, k) for f in (0, 1) for k in range(4)]


def _pose_features(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(_grey(rgb), (POSE_SIDE, POSE_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def _standardize(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


def measure_poses(train_images: list, test_images: list, photometric: dict) -> dict:
    """Share of test images turned by a right angle and mirrored, from a logistic-regression pose classifier
    trained on half the training images in all 8 poses (corrupted by the measured photometric operations),
    its confusion matrix on the other half, and its predictions on the test images unmixed through it."""
    apply = corrupter({**OFF, **photometric})
    corrupted = [apply(img, SEED + i) for i, img in enumerate(train_images)]
    half = len(corrupted) // 2
    fit_part, held_part = corrupted[:half], corrupted[half:]
    pose_x = lambda imgs: _standardize(np.stack([p for img in imgs for p in _d4(_pose_features(img))]))
    pose_y = lambda imgs: np.tile(np.arange(8), len(imgs))
    clf = LogisticRegression(C=0.5, max_iter=300).fit(pose_x(fit_part), pose_y(fit_part))
    pred = clf.predict(pose_x(held_part)).reshape(-1, 8)  # row: image, column: its true pose
    confusion = np.stack([np.bincount(pred[:, t], minlength=8) / len(pred) for t in range(8)])  # P(pred | true)
    accuracy = float(np.trace(confusion) / 8)
    observed = np.bincount(clf.predict(_standardize(np.stack([_pose_features(t) for t in test_images]))),
                           minlength=8) / len(test_images)
    mix, _ = nnls(confusion.T, observed)
    mix = mix / (mix.sum() or 1)
    turned = float(1 - mix[0] - mix[4])  # any quarter turn (of the image or its mirror)
    mirrored = float(mix[4:].sum())
    return {"pose_accuracy": accuracy, "turned": turned, "mirrored": mirrored,
            "poses": [round(float(m), 3) for m in mix]}


def measure_shift(train_images: list, test_images: list, native_side: int | None = None) -> dict:
    """{"gap": per statistic train/test medians and share, "poses": ..., "settings": per operation p and magnitude}.
    native_side: the test images' side before they were resized to these arrays (noise drawn at that resolution)."""
    rng = np.random.default_rng(SEED)
    pick = lambda imgs: [imgs[i] for i in np.sort(rng.choice(len(imgs), min(SAMPLE, len(imgs)), replace=False))]
    train_images, test_images = pick(train_images), pick(test_images)
    side = train_images[0].shape[0]
    noise_scale = float(min(1.0, (native_side or side) / side))
    train = {s: np.array([f(img) for img in train_images]) for s, f in STATISTICS.items()}
    test = {s: np.array([f(img) for img in test_images]) for s, f in STATISTICS.items()}
    quiet = test["noise"] <= np.quantile(train["noise"], 0.975)
    quiet = quiet if quiet.sum() >= 20 else np.ones_like(quiet)  # too few without noise: read them all
    gap, settings = {}, {**OFF, "noise_scale": noise_scale}
    for op, (stat, direction, levels) in OPERATIONS.items():
        check_stop("measuring the test set's shift")
        values = test[stat][quiet] if stat in CLEAN_ONLY else test[stat]
        before = {**settings, "noise": OFF["noise"]} if stat in CLEAN_ONLY else settings
        images = train_images[:SIMULATE]
        base = train[stat]
        if any_on(before):  # the training images as the operations resolved so far leave them
            apply = corrupter(before)
            images = [apply(img, SEED + i) for i, img in enumerate(images)]
            base = np.array([STATISTICS[stat](img) for img in images])
        share = shifted_share(base, values, direction, RESOLUTION.get(stat, 0.0))  # the shift they leave unexplained
        gap[op] = {"statistic": stat, "train": float(np.median(train[stat])), "test": float(np.median(values)),
                   "share": round(share, 3)}
        if share >= MIN_SHARE:
            settings[op] = {"p": round(share, 3), "magnitude": _magnitude(
                op, stat, direction, levels, share, images, base, values, noise_scale)}
    check_stop("measuring the test set's shift")
    poses = measure_poses(train_images, test_images, {k: settings[k] for k in ("noise", "blur", "tint", "noise_scale")})
    if poses["pose_accuracy"] >= 0.3:  # the training images have an upright to learn (chance: 0.125)
        if poses["turned"] >= MIN_POSE_SHARE:
            settings["turn"] = {"p": round(min(1.0, poses["turned"] / 0.75), 3)}  # RandomRotate90 turns 3 times in 4
        if poses["mirrored"] >= MIN_POSE_SHARE:
            settings["flip"] = {"p": round(min(0.5, poses["mirrored"]), 3)}
    return {"images": [len(train_images), len(test_images)], "gap": gap, "poses": poses, "settings": settings}


def describe_shift(shift: dict) -> str:
    """The measured gap and the resolved settings, one line per operation."""
    n_train, n_test = shift["images"]
    lines = [f"test set vs training set ({n_train} / {n_test} images measured):"]
    p = shift["poses"]
    for op, what in (("turn", "turned"), ("flip", "mirrored")):
        s = shift["settings"][op]
        lines.append(f"  {op:<10} {what} {p[what]:.2f} (pose classifier accuracy {p['pose_accuracy']:.2f})"
                     f" -> {'p=%.2f' % s['p'] if s['p'] else 'off'}")
    for op, g in shift["gap"].items():
        s = shift["settings"][op]
        lines.append(f"  {op:<10} {g['statistic']} train {g['train']:.1f}, test {g['test']:.1f}, share {g['share']:.2f}"
                     f" -> {'p=%.2f magnitude %g' % (s['p'], s['magnitude']) if s['p'] else 'off'}")
    return "\n".join(lines)


def image_seed(sample_id: str) -> int:
    """A seed from the image's id alone: the same corruption in every epoch, fold and sweep trial."""
    return zlib.crc32(str(sample_id).encode())


def corrupter(settings: dict):
    """apply(image, seed): the measured corruption, built once, applied deterministically per seed."""
    tf = A.Compose(matched_ops(settings, 1.0))

    def apply(rgb: np.ndarray, seed: int) -> np.ndarray:
        tf.set_random_seed(seed)
        return tf(image=rgb)["image"]
    return apply


def corrupt(rgb: np.ndarray, settings: dict, seed: int) -> np.ndarray:
    """The measured corruption applied once to an image, deterministically (noisy validation)."""
    return corrupter(settings)(rgb, seed)


def any_on(settings: dict | None) -> bool:
    return bool(settings) and any(v["p"] for k, v in settings.items() if isinstance(v, dict))


def native_side(items: list, n: int = 50) -> int:
    """Median side (the larger of width and height) of up to n images, read from the file headers alone; 0 when
    none can be read."""
    sides = []
    for item in items[:: max(1, len(items) // n)][:n]:
        if isinstance(item, np.ndarray):
            sides.append(max(item.shape[:2]))
            continue
        try:
            with Image.open(item) as img:
                sides.append(max(img.size))
        except Exception:  # noqa: BLE001 - an unreadable file is reported by name when the images are screened
            continue
    return int(np.median(sides)) if sides else 0


def measure_data(train_items: list, test_items: list, img_size: int, native: int) -> dict:
    """measure_shift on images as the training transform sees them: decoded and resized to img_size."""
    rng = np.random.default_rng(SEED)
    pick = lambda items: [items[i] for i in np.sort(rng.choice(len(items), min(SAMPLE, len(items)), replace=False))]
    return measure_shift([_at_size(load_image(i), img_size) for i in pick(train_items)],
                         [_at_size(load_image(i), img_size) for i in pick(test_items)], native)


def _at_size(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[:2] == (side, side):
        return image
    shrink = max(image.shape[:2]) > side
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def noisy_copies(images: list, ids: list, settings: dict) -> list[np.ndarray]:
    """Each image with the measured corruption, seeded by its id (noisy validation)."""
    apply = corrupter(settings)

    def one(img, sample_id):
        check_stop("making the noisy validation images")
        return apply(load_image(img), image_seed(sample_id))
    return [one(img, i) for img, i in zip(images, ids)]
