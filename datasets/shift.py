"""How the test images differ from the training images, and the augmentation that covers it (--aug_preset auto,
--val_noise auto).

Usage:
    shift = measure_shift(train_images, test_images)   # HxWx3 uint8 arrays, at the training size
    train_tf = AUGS.build("auto", img_size, strength, mean, std, settings=shift["settings"])
    val_images = noisy_copies(items, ids, shift["settings"], img_size)      # datasets/corruption.py: noisy validation

One statistic per corruption the write-ups saw in test sets: Gaussian noise (Immerkaer's sigma), tint (spread of the
channel means), brightness (mean grey), contrast (spread of the smoothed grey), blur (variance of the Laplacian of the
median-filtered grey over the grey variance), downscale-then-upscale (the share of edge pixels linear between their
neighbours), JPEG (the share of its 8x8 blocks' high frequencies rounded to 0), each per image; small rotations from a
whole set's gradient-orientation histograms; right-angle turns and mirrors from a pose classifier trained on the
training images in their 8 square poses. Noise, JPEG and the downscale are read on the images as stored (a resize
smooths noise and moves the block grid and the samples), the rest at the training size, as the model sees them. Blur
and downscale, two readings of one lost sharpness, are resolved together (_resolve_smoothing).
- Every operation is simulated where the test set got it: on the stored training images, then resized. For each
  operation and magnitude, the training images carrying every other operation found so far are the base, the same
  images with this operation on all of them the shifted sample, and the test set's distribution of the statistic
  is fitted as the mixture (1 - share) base + share shifted (least squares on the empirical CDFs). The magnitude
  with the best fit wins, with its share; the operation is on when the test set differs from the base beyond
  chance (a two-sided KS test at ALPHA, and by at least MIN_SHARE), the share is at least MIN_SHARE and the fitted
  mixture explains the difference (takes at least EXPLAINED of its KS distance away: else it is another
  operation's, misread). Two passes: the second resolves each operation against all the others the first found (a
  blur is not mistaken for the noise it hides, nor JPEG for a blur). Magnitudes are the augmentation's own
  parameters (matched_ops), so the training augmentation draws what was measured.
- small rotations: the test set's mean orientation histogram against the training images' and their rotated
  copies', a matched filter along a rotation's signature checked against random halves of both sets; one image's
  gradients are too few to say how a digit is turned, a few hundred images' are not.
- turns and flips (datasets/poses.py): the pose classifier's predictions on the test set, unmixed through its own
  confusion matrix on held-out training images (corrupted as the test set is, so noise does not read as a pose).
benchmarks/shift_calibration.py measures how right this is on random recipes with known truth.
Everything is seeded by SEED alone: every run and sweep trial on the same data and img_size gets the same settings.
"""
import cv2
import numpy as np

from datasets.corruption import corrupter
from datasets.files import load_image
from datasets.poses import measure_poses
from utils.image_stats import colour_cast, jpeg_zeros, linear_runs, noise_sigma, orientation_histogram, smooth_sharpness
from utils.stop import check_stop

SAMPLE = 300       # images per split that are measured (a random, fixed subset of larger sets)
SIMULATE = 200     # training images each operation is simulated on
MIN_SHARE = 0.1    # an operation is switched on when at least this share of the test set shows it
MIN_POSE_ACCURACY = 0.2  # chance: 0.125. The unmixing corrects for the classifier's errors, so a weak one still reads
# the shares (documents under noise: accuracy 0.29, turned 0.72 and mirrored 0.45 measured, 0.75 and 0.5 true)
MIN_POSE_SHARE = 0.25  # turns and flips: the pose estimate's own error on upright sets reaches ~0.15
SEED = 0
VERSION = 5        # of the measure: a cached measure (datasets/shift_cache.py) of another version is measured again

# per operation, in the order they are resolved (each against training images that already carry the ones before,
# all of them, noise included): its statistic and the magnitudes tried (the augmentation's own parameter)
OPERATIONS = {  # JPEG first (its statistic shrugs off the rest, and its ringing reads as noise), then tint (its
    # clipping at black and white shows in the noise statistic), then noise, which hides the rest
    "jpeg": ("jpeg zeros", [10, 20, 30, 40, 50, 60, 70, 80, 90]),                    # 100 - the lowest quality
    "tint": ("tint", [5, 10, 15, 20, 30, 40, 50, 60, 80, 100]),                       # grey levels per channel
    "noise": ("noise", [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4]),   # std, fraction of 255
    "brightness": ("brightness", [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]),            # shift, fraction of 255
    "contrast": ("contrast", [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7]),           # factor 1 +- this
    "downscale": ("linear runs", [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0]),  # factor: side / shrunk side
    "blur": ("sharpness", [0.5, 0.75, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0]),          # Gaussian sigma, px
    "rotate": ("alignment", [2, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40]),                # degrees
}
NATIVE = {"jpeg zeros", "noise", "linear runs"}  # read on the images as stored (JPEG's 8x8 grid; noise, which resizing
# smooths; an upscale's samples, which resizing moves)
SMOOTHING = ("blur", "downscale")  # two readings of one lost sharpness, resolved together (_resolve_smoothing)
ORIENTATION_BINS = 36    # of 2.5 degrees, over 0-90
PASSES = 2                # over all operations: each resolved again against all the others the pass before found
PERMUTATIONS = 300        # random halves of the training and test images: the chance spread of the rotation statistic
FILLS = ("black", "white", "edge")  # a rotation's corners: constant 0, constant 255, the border pixels repeated
ROTATION_PROBE, ROTATION_Z = 10, 3.0  # degrees: a rotation's signature; counts beyond this many of its chance spreads
STORED_MAX = 2            # stored images larger than this many times the training size are measured at that size
BOOTSTRAP = 30            # resamples of the test images that say how sure a share is
ALPHA = 0.002             # a statistic's shift counts when a two-sided KS test rejects "no shift" at this level
EXPLAINED = 0.5           # an operation is on only when its fitted mixture takes at least this share of the test
# set's KS distance from the base away: a shift it cannot explain is another operation's, misread (a blur of sigma 4 on
# the digits' tail, where no blur shows under their noise; a contrast change on pages that have none)
OFF = {"turn": {"p": 0.0}, "flip": {"p": 0.0}, **{op: {"p": 0.0, "magnitude": 0.0} for op in OPERATIONS}}


def _simulator(settings: dict):
    return corrupter(settings, shared_draws=True)  # the draws the measure was calibrated on (docs/noisy-test.md,
    # seventh and eighth passes: with independent draws the rotations' shares and a blur under noise are misread)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


STATISTICS = {
    "noise": lambda rgb: noise_sigma(_grey(rgb)),
    "sharpness": lambda rgb: smooth_sharpness(_grey(rgb)),  # blur, not contrast nor noise
    "tint": colour_cast,
    "brightness": lambda rgb: float(_grey(rgb).mean()),
    "contrast": lambda rgb: float(np.subtract(*np.percentile(cv2.GaussianBlur(_grey(rgb), (0, 0), 1.5), [95, 5]))),
    "jpeg zeros": lambda rgb: jpeg_zeros(_grey(rgb)),
    "linear runs": lambda rgb: linear_runs(_grey(rgb)),
}  # "alignment" (rotate): read from a whole set's orientation histograms (_resolve_rotation)


def _orientations(images: list) -> np.ndarray:
    """Each image's orientation histogram (utils/image_stats.py), made symmetric: a mirror reads as the image."""
    hists = np.stack([orientation_histogram(_grey(img), ORIENTATION_BINS) for img in images])
    return (hists + np.roll(hists[:, ::-1], 1, axis=1)) / 2


def _resolve_rotation(images: list, test_images: list, settings: dict, to_side) -> tuple[float, float, dict]:
    """(share, magnitude, gap) of small rotations, read from the mean orientation histogram of a whole set: one
    image's gradients are too few to say how it is turned (a digit), a few hundred images' are not. A rotation by
    up to m degrees smears the training images' histogram; the test set's is fitted as (1 - s) of the training
    images' (with the operations resolved so far) + s of the same images rotated, least squares in units of each
    bin's standard error; the magnitude that fits best wins, and the corners' fill (FILLS) that fits best with it:
    black corners on white paper are long edges at the rotated angle, white ones on white paper none at all.
    gap["fill"] names it. images: the training images as stored (the settings are applied there, as the test set
    got them), to_side: the resize to the training size."""
    apply = _simulator(settings)
    base = _orientations([to_side(apply(img, SEED + i)) for i, img in enumerate(images)])
    test = _orientations(test_images)
    error = np.sqrt(base.var(0) / len(base) + test.var(0) / len(test)) + 1e-9
    d = (test.mean(0) - base.mean(0)) / error
    gap = {"train": float(base.mean(0).max() * ORIENTATION_BINS), "test": float(test.mean(0).max() * ORIENTATION_BINS),
           "share": 0.0}  # the histograms' peak over a flat one: how axis-aligned the images are
    fits = [f for f in (_rotation_fit(images, settings, to_side, base, test, error, d, fill) for fill in FILLS) if f]
    if not fits:
        return 0.0, 0.0, gap
    share, magnitude, _, fill, h = min(fits, key=lambda f: f[2])
    gap["share"], gap["fill"], gap["share_sd"] = round(share, 3), fill, _bootstrap_sd(
        lambda rows: _share_along((test[rows].mean(0) - base.mean(0)) / error, h), len(test))
    return share, magnitude, gap


def _share_along(d: np.ndarray, h: np.ndarray) -> float:
    return float(np.clip(d @ h / (h @ h), 0.0, 1.0)) if h @ h > 0 else 0.0


def _rotation_fit(images, settings, to_side, base, test, error, d, fill) -> tuple | None:
    """(share, magnitude, residual, fill, smear) of rotations with these corners, or None when the test set's
    histogram does not differ from the training images' along a rotation's smear beyond chance."""
    def smear(m):  # the change of the mean histogram when every image is rotated by up to m degrees
        apply = _simulator({**settings, "rotate": {"p": 1.0, "magnitude": m, "fill": fill}})
        return (_orientations([to_side(apply(img, SEED + i)) for i, img in enumerate(images)]).mean(0)
                - base.mean(0)) / error
    smears = {}

    def fit(m):
        smears[m] = h = smear(m)
        share = _share_along(d, h)
        return share, float(np.sum((d - share * h) ** 2))
    # a matched filter: the difference along the smear a rotation leaves, against the same for random halves of both
    # sets (the bins are correlated, so a sum of squares over them would hear chance as often as a rotation)
    direction = smear(ROTATION_PROBE)
    direction /= np.linalg.norm(direction) + 1e-12
    pooled, rng = np.concatenate([base, test]) @ (direction / error), np.random.default_rng(SEED)  # d's units
    null = []
    for _ in range(PERMUTATIONS):
        order = rng.permutation(len(pooled))
        null.append(float(pooled[order[len(base):]].mean() - pooled[order[:len(base)]].mean()))
    if d @ direction <= ROTATION_Z * np.std(null):
        return None
    share, magnitude = _best_fit(OPERATIONS["rotate"][1], fit)
    h = smears[magnitude]
    return share, magnitude, float(np.sum((d - share * h) ** 2)), fill, h


def _best_fit(levels: list, fit) -> tuple[float, float]:
    """(share, magnitude) of the level whose fit(level) -> (share, residual) has the least residual: every third
    level first, then downhill from the best of those one level at a time (the residual falls to one minimum)."""
    fits = {}

    def at(k):
        if k not in fits:
            check_stop("measuring the test set's shift")
            fits[k] = fit(levels[k])
        return fits[k][1]
    best = min(range(0, len(levels), 3), key=at)
    while True:
        nearer = min((k for k in (best - 1, best + 1) if 0 <= k < len(levels)), key=at)
        if at(nearer) >= at(best):
            return fits[best][0], float(levels[best])
        best = nearer


def _ecdf(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.sort(values), grid, side="right") / len(values)


def mixture_share(base: np.ndarray, test: np.ndarray, shifted: np.ndarray,
                  share: float | None = None) -> tuple[float, float]:
    """(share s, residual): the test distribution of a statistic fitted as (1 - s) base + s shifted, least squares
    over the three empirical CDFs on their pooled values. base: the training images (with the operations resolved
    so far), shifted: the same images with this operation applied to all of them. share given: its residual."""
    grid = np.unique(np.concatenate([base, test, shifted]))
    f, t, g = _ecdf(base, grid), _ecdf(test, grid), _ecdf(shifted, grid)
    d, h = t - f, g - f
    if share is None:
        share = float(np.clip(d @ h / (h @ h), 0.0, 1.0)) if h @ h > 0 else 0.0
    return share, float(np.mean((d - share * h) ** 2))


def explained(base: np.ndarray, test: np.ndarray, shifted: np.ndarray, share: float) -> float:
    """The share of the test values' KS distance from the base that the fitted mixture (1 - share) base + share
    shifted takes away: 1 = it explains the shift, 0 = none of it."""
    grid = np.unique(np.concatenate([base, test, shifted]))
    f, t, g = _ecdf(base, grid), _ecdf(test, grid), _ecdf(shifted, grid)
    before = np.abs(t - f).max()
    return float(1 - np.abs(t - (1 - share) * f - share * g).max() / before) if before else 0.0


def significant(base: np.ndarray, test: np.ndarray, alpha: float = ALPHA) -> bool:
    """Do the two samples of a statistic differ beyond chance (two-sided Kolmogorov-Smirnov test at alpha) and by
    at least MIN_SHARE (the KS distance bounds the share of shifted images from below: a smaller shift is a
    mismatch of the simulation, not a corruption worth training for)?"""
    grid = np.concatenate([base, test])
    distance = np.abs(_ecdf(base, grid) - _ecdf(test, grid)).max()
    n, m = len(base), len(test)
    return bool(distance > max(MIN_SHARE, np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m))))


def _resolve(op: str, statistic, images: list, test_values: np.ndarray, settings: dict) -> tuple[float, float, dict]:
    """(share, magnitude, gap) of one operation: the training images carrying the settings resolved so far are the
    base; for each magnitude the same images with this operation on every one of them are the shifted sample; the
    magnitude whose mixture fits the test values best wins, its share with it. statistic(image as stored) reads it
    where the test set's statistic was read (the image resized to the training size, or as stored)."""
    apply = _simulator(settings)
    base = np.array([statistic(apply(img, SEED + i)) for i, img in enumerate(images)])
    gap = {"train": float(np.median(base)), "test": float(np.median(test_values)), "share": 0.0}
    if not significant(base, test_values):
        return 0.0, 0.0, gap
    shifted = {}

    def fit(m):
        apply = _simulator({**settings, op: {"p": 1.0, "magnitude": m}})
        shifted[m] = np.array([statistic(apply(img, SEED + i)) for i, img in enumerate(images)])
        return mixture_share(base, test_values, shifted[m])
    share, magnitude = _best_fit(OPERATIONS[op][1], fit)
    gap["explained"] = round(explained(base, test_values, shifted[magnitude], share), 3)
    if gap["explained"] < EXPLAINED:
        return 0.0, 0.0, gap
    gap["share"], gap["share_sd"] = round(share, 3), _bootstrap_sd(
        lambda rows: mixture_share(base, test_values[rows], shifted[magnitude])[0], len(test_values))
    return share, magnitude, gap


def _resolve_smoothing(readers: dict, images: list, test_values: dict, others: dict) -> dict:
    """{op: (share, magnitude, gap)} for blur and downscale, at most one of them on: both lose sharpness, so each is
    fitted alone on its own statistic (blur: the sharpness, downscale: the linear runs), and where both are found the
    one whose mixture, at its share and magnitude, fits the test set on both statistics better is kept; the other's
    gap names it ("read_as"). A blur curves every edge; a shrunk image stretched back is linear between its samples."""
    stats = {op: OPERATIONS[op][0] for op in SMOOTHING}
    found = {op: _resolve(op, readers[stat], images, test_values[stat], others) for op, stat in stats.items()}
    on = [op for op in SMOOTHING if found[op][0] >= MIN_SHARE]
    if len(on) < 2:
        return found
    apply = _simulator(others)
    plain = [apply(img, SEED + i) for i, img in enumerate(images)]
    base = {stat: np.array([readers[stat](x) for x in plain]) for stat in stats.values()}

    def misfit(op):
        share, magnitude, _ = found[op]
        apply = _simulator({**others, op: {"p": 1.0, "magnitude": magnitude}})
        shifted = [apply(img, SEED + i) for i, img in enumerate(images)]
        return sum(mixture_share(base[stat], test_values[stat], np.array([readers[stat](x) for x in shifted]),
                                 share)[1] for stat in stats.values())
    keep = min(on, key=misfit)
    return {op: found[op] if op == keep else (0.0, 0.0, {**found[op][2], "read_as": keep}) for op in SMOOTHING}


def _bootstrap_sd(share_of, n: int) -> float:
    """How sure a share is: its standard deviation over BOOTSTRAP resamples of the test images (share_of(rows))."""
    rng = np.random.default_rng(SEED)
    return round(float(np.std([share_of(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)])), 3)


def measure_shift(train_images: list, test_images: list, native_side: int | None = None,
                  native: tuple[list, list] | None = None) -> dict:
    """{"gap": per statistic train/test medians and share, "poses": ..., "settings": per operation p and magnitude}.
    train_images, test_images: at the training size. native_side: the test images' side as stored; native: the same
    (train, test) images as stored. Every operation is simulated where the test set got it, on the stored images,
    then read as the test images are: resized to the training size, or as stored (noise, JPEG's 8x8 grid).
    Without native, the arrays given are taken as stored."""
    rng = np.random.default_rng(SEED)
    picked = [np.sort(rng.choice(len(imgs), min(SAMPLE, len(imgs)), replace=False))
              for imgs in (train_images, test_images)]
    train_images, test_images = ([imgs[i] for i in idx] for imgs, idx in zip((train_images, test_images), picked))
    side = train_images[0].shape[0]
    stored_side = min(native_side or side, STORED_MAX * side)  # larger images are measured at this side: time
    if native is None:
        native, stored_side = (train_images, test_images), side
    else:
        native = tuple([_at_most(imgs[i], stored_side) for i in idx] for imgs, idx in zip(native, picked))

    def to_side(img):
        return at_size(img, side)
    readers = {stat: (f if stat in NATIVE else (lambda img, f=f: f(to_side(img)))) for stat, f in STATISTICS.items()}
    test_values = {stat: np.array([f(img) for img in (native[1] if stat in NATIVE else test_images)])
                   for stat, f in STATISTICS.items()}
    gap, stored = {}, {**OFF, "noise_scale": 1.0}  # in the stored images' units
    for _ in range(PASSES):  # the second pass sees every other operation the first found, not only the earlier ones
        for op, (stat, _) in OPERATIONS.items():
            check_stop("measuring the test set's shift")
            others = {**stored, op: OFF[op]}
            if op == "rotate":
                found = {op: _resolve_rotation(native[0][:SIMULATE], test_images, others, to_side)}
            elif op in SMOOTHING:  # both at the first of them
                if op != SMOOTHING[0]:
                    continue
                found = _resolve_smoothing(readers, native[0][:SIMULATE], test_values,
                                           {**others, **{o: OFF[o] for o in SMOOTHING}})
            else:
                found = {op: _resolve(op, readers[stat], native[0][:SIMULATE], test_values[stat], others)}
            for name, (share, magnitude, g) in found.items():
                gap[name] = {**g, "statistic": OPERATIONS[name][0]}
                stored[name] = {"p": round(share, 3), "magnitude": magnitude} if share >= MIN_SHARE else OFF[name]
                if name == "rotate" and stored[name]["p"]:
                    stored[name]["fill"] = g["fill"]
    settings = training_units(stored, stored_side, side)
    check_stop("measuring the test set's shift")
    photometric = {k: settings[k] for k in ("noise", "blur", "tint", "noise_scale")}
    poses = measure_poses(train_images, test_images, _simulator({**OFF, **photometric}), SEED)
    if poses["pose_accuracy"] >= MIN_POSE_ACCURACY:  # the training images have an upright to learn
        if poses["turned"] >= MIN_POSE_SHARE:
            settings["turn"] = {"p": round(min(1.0, poses["turned"] / 0.75), 3)}  # RandomRotate90 turns 3 times in 4
        if poses["mirrored"] >= MIN_POSE_SHARE:
            settings["flip"] = {"p": round(min(0.5, poses["mirrored"]), 3)}
    return {"images": [len(train_images), len(test_images)], "gap": gap, "poses": poses, "settings": settings,
            "version": VERSION}


def training_units(stored: dict, stored_side: int, side: int) -> dict:
    """Settings measured on the stored images as the training augmentation applies them, after the resize: noise
    drawn at the stored resolution (noise_scale) and weakened by a downscale; blur's sigma and a downscale's factor
    scaled with the side (a factor the resize to a smaller side has already applied is off)."""
    settings = {**stored, "noise_scale": float(min(1.0, stored_side / side))}
    if stored["downscale"]["p"]:
        factor = round(stored["downscale"]["magnitude"] * side / stored_side, 3)
        settings["downscale"] = {**stored["downscale"], "magnitude": factor} if factor >= 1.25 else OFF["downscale"]
    if stored["noise"]["p"]:
        settings["noise"] = {**stored["noise"], "magnitude": round(stored["noise"]["magnitude"] *
                                                                   min(1.0, side / stored_side), 4)}
    if stored["blur"]["p"]:
        settings["blur"] = {**stored["blur"], "magnitude": round(stored["blur"]["magnitude"] * side / stored_side, 3)}
    return settings


def _at_most(image: np.ndarray, side: int) -> np.ndarray:
    """The image shrunk so that its larger side is at most `side` (aspect kept), else as it is."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    k = side / max(h, w)
    return cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)


def measure_data(train_items: list, test_items: list, img_size: int, native: int) -> dict:
    """measure_shift on images as the training transform sees them: decoded and resized to img_size."""
    rng = np.random.default_rng(SEED)
    pick = lambda items: [items[i] for i in np.sort(rng.choice(len(items), min(SAMPLE, len(items)), replace=False))]
    stored = [[load_image(i) for i in pick(items)] for items in (train_items, test_items)]
    return measure_shift(*([at_size(img, img_size) for img in images] for images in stored), native,
                         native=(stored[0], stored[1]))


def at_size(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[:2] == (side, side):
        return image
    shrink = max(image.shape[:2]) > side
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
