"""Test-matched augmentation and noisy validation (datasets/shift.py), the hard benchmark, --pretrained auto:
on constructed sets of real digits, a test set with added noise, turns or tint switches those operations on
and a clean one leaves them off."""
import albumentations as A
import cv2
import numpy as np
import pytest

from conftest import _digit_images
from datasets import load_data
from datasets.corruption import any_on, corrupt, image_seed
from datasets.digits import HARD_CLASSES, answers_path, export_hard, score
from datasets.shift import EXPLAINED, MIN_SHARE, explained, measure_shift, mixture_share, significant
from datasets.transforms import AUGS, matched_ops
from models import find_pretrained
from utils import UserError
from workflows.flags import parse_config
from workflows.prepare import describe_shift

MEAN, STD = [0.5] * 3, [0.25] * 3


@pytest.fixture(scope="module")
def digit_sets():
    images, _ = _digit_images(600, seed=3)
    rgb = [np.repeat(cv2.resize(g, (48, 48))[..., None], 3, axis=-1) for g in images]
    return rgb[:300], rgb[300:]


def corrupted(images, *ops):
    tf = A.Compose(list(ops), seed=11)
    return [tf(image=img)["image"] for img in images]


def op_names(compose):
    return {type(t).__name__ for t in compose.transforms}


def test_clean_test_set_leaves_every_operation_off(digit_sets):
    train, test = digit_sets
    shift = measure_shift(train, test)
    assert not any_on(shift["settings"]), describe_shift(shift)
    ops = op_names(AUGS.build("auto", 48, 1.0, MEAN, STD, settings=shift["settings"]))
    assert not ops & {"RandomRotate90", "GaussNoise", "RGBShift", "HorizontalFlip", "GaussianBlur"}


@pytest.fixture(scope="module")
def noisy_shift(digit_sets):
    train, test = digit_sets
    return measure_shift(train, corrupted(test, A.GaussNoise(std_range=(0.1, 0.2), p=1.0)))


def test_noise_in_the_test_set_switches_noise_on(noisy_shift):
    shift = noisy_shift
    noise = shift["settings"]["noise"]
    assert noise["p"] > 0.7 and 0.05 <= noise["magnitude"] <= 0.4, describe_shift(shift)
    assert shift["settings"]["turn"]["p"] == 0 and shift["settings"]["tint"]["p"] == 0
    assert "GaussNoise" in op_names(AUGS.build("auto", 48, 1.0, MEAN, STD, settings=shift["settings"]))
    assert 0 < shift["gap"]["noise"]["share_sd"] < 0.1  # how sure: the share's bootstrap sd, printed beside it
    assert f"± {shift['gap']['noise']['share_sd']:.2f} -> p=" in describe_shift(shift)


def test_turns_and_tint_in_the_test_set_switch_them_on(digit_sets):
    train, test = digit_sets
    shift = measure_shift(train, corrupted(test, A.RandomRotate90(p=1.0), A.RGBShift(40, 40, 40, p=1.0)))
    s = shift["settings"]
    assert s["turn"]["p"] >= 0.8 and s["tint"]["p"] > 0.7 and s["noise"]["p"] == 0, describe_shift(shift)
    assert {"RandomRotate90", "RGBShift"} <= op_names(AUGS.build("auto", 48, 1.0, MEAN, STD, settings=s))
    assert "turned" in describe_shift(shift) and "tint" in describe_shift(shift)


def test_share_is_a_fitted_mixture_and_only_when_significant():
    rng = np.random.default_rng(0)
    train, shifted = rng.normal(0, 1, 300), rng.normal(10, 1, 300)
    assert not significant(train, rng.normal(0, 1, 300))  # same distribution: not significant
    for share in (0.3, 0.7):  # that share of the test set shifted: the mixture finds it, where KS alone bounds it
        n = int(300 * share)
        test = np.concatenate([rng.normal(0, 1, 300 - n), rng.normal(10, 1, n)])
        assert significant(train, test) and mixture_share(train, test, shifted)[0] == pytest.approx(share, abs=0.05)
    overlapping = np.concatenate([rng.normal(0, 1, 150), rng.normal(1.5, 1, 150)])  # half, hidden in the overlap
    assert mixture_share(train, overlapping, rng.normal(1.5, 1, 300))[0] == pytest.approx(0.5, abs=0.12)


def test_an_operation_must_explain_the_shift_it_is_fitted_to():
    """The digits' case: the test values spread wider than the base on both sides; an operation that only moves
    values one way fits a share to one tail and leaves most of the difference: it is refused (EXPLAINED)."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 300)
    blurred = base - 3  # what the operation does to every image
    half = np.concatenate([rng.normal(0, 1, 150), rng.normal(-3, 1, 150)])  # half the test images got it
    share, _ = mixture_share(base, half, blurred)
    assert explained(base, half, blurred, share) > 0.8 >= EXPLAINED
    wider = rng.normal(0, 2.5, 300)  # something else: both tails
    share, _ = mixture_share(base, wider, blurred)
    assert significant(base, wider) and share >= MIN_SHARE and explained(base, wider, blurred, share) < EXPLAINED


def test_auto_preset_strength_and_fallback(digit_sets, noisy_shift):
    settings = noisy_shift["settings"]
    image = digit_sets[0][0]
    none = AUGS.build("auto", 48, 0.0, MEAN, STD, settings=settings)(image=image)["image"]
    plain = AUGS.build("none", 48, 0.0, MEAN, STD)(image=image)["image"]
    assert np.array_equal(none.numpy(), plain.numpy())  # strength 0: resize + normalize only
    light = AUGS.build("auto", 48, 1.0, MEAN, STD)  # no test set measured: the light preset
    assert op_names(light) == op_names(AUGS.build("light", 48, 1.0, MEAN, STD))


def test_corruption_is_fixed_per_image(digit_sets):
    from datasets.shift import OFF
    train, _ = digit_sets
    settings = {**OFF, "noise": {"p": 1.0, "magnitude": 0.15}, "turn": {"p": 1.0}}  # as a measure would give them
    a = corrupt(train[0], settings, image_seed("img_001.png"))
    assert np.array_equal(a, corrupt(train[0], settings, image_seed("img_001.png")))
    assert not np.array_equal(a, train[0])
    assert not np.array_equal(a, corrupt(train[0], settings, image_seed("img_002.png")))


def test_hard_benchmark_is_a_competition_folder(tmp_path):
    data = load_data("digits_hard")
    counts = np.bincount(data.labels)
    assert [int(c) for c in data.classes] == HARD_CLASSES and "5" not in data.classes and "9" not in data.classes
    assert counts.max() >= 4 * counts.min() and 1.8 * len(data.labels) <= len(data.test_items) <= 2.5 * len(data.labels)
    folder = export_hard(tmp_path / "hard")
    exported = load_data(str(folder))
    assert exported.test_labels is None and answers_path(folder).parent == folder.parent  # the labels lie beside it
    assert len({line.split(",")[1] for line in (folder / "sample_submission.csv").read_text().splitlines()[1:]}) == 1
    assert exported.ids == data.ids and exported.test_ids == data.test_ids
    assert np.array_equal(cv2.imread(str(exported.test_items[0]))[..., ::-1], data.test_items[0])
    assert score(answers_path(folder), answers_path(folder)) == 1.0
    sub = tmp_path / "sub.csv"
    sub.write_text("ID,target\n" + "".join(f"{i},0\n" for i in data.test_ids[:-1]))
    with pytest.raises(UserError, match="no prediction"):
        score(sub, answers_path(folder))


def test_pretrained_auto_uses_a_local_file_and_never_waits(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPCLS_WEIGHTS_DIR", str(tmp_path))
    path, why = find_pretrained("resnet18")  # HF_HUB_OFFLINE (conftest): no hub
    assert path == "" and "random initialization" in why
    (tmp_path / "resnet18.safetensors").write_bytes(b"")
    path, why = find_pretrained("resnet18")
    assert path == str(tmp_path / "resnet18.safetensors") and str(tmp_path) in why


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("True", "true"), ("0", "false"), ("no", "false")])
def test_pretrained_is_auto_true_or_false(text, expected):
    assert parse_config([f"--pretrained={text}"]).pretrained == expected


def test_pseudo_label_file_is_checked_and_thresholded(tmp_path):
    from datasets import Data
    from datasets.pseudo import read_pseudo_labels, write_probs
    data = Data(classes=["a", "b"], targets=["a", "b"], items=[], labels=np.zeros(0, int), ids=[],
                test_items=[None] * 3, test_ids=["t1", "t2", "t3"])
    path = tmp_path / "probs.csv"
    write_probs(path, ["t3", "t1", "t2"], np.array([[0.95, 0.05], [0.4, 0.6], [0.05, 0.95]]), ["a", "b"], "run x")
    rows, labels, info = read_pseudo_labels(str(path), data, 0.9)
    assert rows.tolist() == [2, 1] and labels.tolist() == [0, 1]  # test rows t3 (a) and t2 (b); t1 is unsure
    assert info["added"] == 2 and info["per_class"] == {"a": 1, "b": 1} and info["source"] == ["run x"]
    write_probs(path, ["t1", "other"], np.full((2, 2), 0.5), ["a", "b"], "run x")
    with pytest.raises(UserError, match="not in the test set"):
        read_pseudo_labels(str(path), data, 0.9)
    write_probs(path, ["t1"], np.full((1, 3), 0.3), ["a", "b", "c"], "run x")
    with pytest.raises(UserError, match="p_a, p_b"):
        read_pseudo_labels(str(path), data, 0.9)


def test_class_balanced_pseudo_labels_give_an_unsure_class_its_share():
    from datasets.pseudo import select_confident
    # class a: confident rows 0-3; class b: never above 0.6, so the threshold alone gives it nothing
    probs = np.array([[0.99, 0.01], [0.97, 0.03], [0.95, 0.05], [0.6, 0.4],
                      [0.45, 0.55], [0.4, 0.6], [0.48, 0.52], [0.3, 0.7]])
    assert np.flatnonzero(select_confident(probs, 0.9, 0.0)).tolist() == [0, 1, 2]
    # share 0.5: the top half of each predicted class (a: rows 0, 1; b: rows 7, 5), plus all above the threshold
    assert np.flatnonzero(select_confident(probs, 0.9, 0.5)).tolist() == [0, 1, 2, 5, 7]
    assert select_confident(probs, 1.0, 1.0).all() and not select_confident(np.zeros((0, 2)), 0.9, 0.5).size


def test_batchnorm_adapts_to_the_test_images_and_a_model_without_says_so(capsys):
    import torch

    from models import adapt_batchnorm, adapt_test_bn
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    test = [(torch.randn(8, 3, 8, 8) * 3 + 2, None) for _ in range(3)]  # shifted and scaled inputs
    assert adapt_batchnorm(model, test, torch.device("cpu")) == 1
    features = torch.cat([model[0](x) for x, _ in test])
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-4)
    assert not model.training and model[1].momentum == 0.1
    adapt_test_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), test, torch.device("cpu"), "plain")
    assert "plain has no BatchNorm layers" in capsys.readouterr().out


@pytest.mark.parametrize("fill", [0, 255])
def test_rotations_are_read_with_the_corners_they_left(digit_sets, fill):
    """Dark digits on white paper, turned by up to 20 degrees: black corners are long edges at the turned angle, white
    ones none at all; either way the rotation is found, and the augmentation gives the corners the test set has."""
    train, test = ([255 - img for img in images] for images in digit_sets)
    rotated = corrupted(test, A.Rotate(limit=(-20, 20), border_mode=cv2.BORDER_CONSTANT, fill=fill, p=1.0))
    shift = measure_shift(train, rotated)
    rotate = shift["settings"]["rotate"]
    assert rotate["p"] >= 0.5 and 10 <= rotate["magnitude"] <= 30, describe_shift(shift)
    assert rotate["fill"] == "black" if fill == 0 else rotate["fill"] in ("white", "edge")
    assert f"{rotate['fill']} corners" in describe_shift(shift)
    ops = {type(t).__name__: t for t in AUGS.build("auto", 48, 1.0, MEAN, STD, settings=shift["settings"]).transforms}
    assert ops["Rotate"].border_mode == ops["Affine"].border_mode  # the jitter leaves the same corners
    assert fill != 255 or ops["Rotate"].border_mode == cv2.BORDER_REPLICATE or ops["Rotate"].fill == 255


def test_the_floor_draws_what_the_measure_left_off_and_nothing_on_a_clean_test_set():
    from datasets.corruption import FLOOR, with_floor
    from datasets.shift import OFF
    measured = {**OFF, "turn": {"p": 1.0}, "noise": {"p": 0.6, "magnitude": 0.2}, "noise_scale": 0.5}
    floored = with_floor(measured, 0.2)
    assert floored["noise"] == measured["noise"] and floored["turn"] == {"p": 1.0}  # as measured
    assert floored["flip"] == OFF["flip"] and floored["rotate"] == OFF["rotate"]  # poses never guessed
    assert {op for op, s in floored.items() if isinstance(s, dict) and s["p"] == 0.2} == set(FLOOR) - {"noise"}
    assert floored["blur"] == {"p": 0.2, "magnitude": FLOOR["blur"]} and floored["noise_scale"] == 0.5
    assert with_floor(OFF, 0.2) == OFF and with_floor(measured, 0.0) == measured and with_floor(None, 0.2) is None
    ops = A.Compose(matched_ops(floored, 1.0))  # the augmentation draws them
    assert {type(t).__name__ for t in ops.transforms} >= {"GaussianBlur", "ImageCompression", "RGBShift"}


@pytest.fixture(scope="module")
def page_sets():
    from benchmarks.shift_calibration import documents
    pages = documents(400, np.random.default_rng(5))
    return pages[:200], pages[200:]


def test_blur_under_noise_is_found_on_half_the_pages(page_sets):
    """Every test page noisy, half of them blurred too: the median-filtered sharpness sees the blur through the noise
    (the plain variance of the Laplacian reads the noise's high frequencies as sharpness and missed it)."""
    train, test = page_sets
    rng = np.random.default_rng(0)
    blurred = [cv2.GaussianBlur(img, (0, 0), float(rng.uniform(1.2, 2.0))) if k % 2 else img
               for k, img in enumerate(test)]
    shift = measure_shift(train, corrupted(blurred, A.GaussNoise(std_range=(0.1, 0.15), p=1.0)))
    blur, noise = shift["settings"]["blur"], shift["settings"]["noise"]
    assert noise["p"] > 0.7 and 0.3 <= blur["p"] <= 0.7 and 1.2 <= blur["magnitude"] <= 3.0, describe_shift(shift)


def test_a_measured_magnitude_is_drawn_from_half_of_it_to_all_of_it_both_ways():
    """Brightness, contrast and blur as the augmentation draws them (and the measure simulates them): every corrupted
    image at least half the magnitude away, up and down both, so the share measured is the share visibly changed."""
    from datasets.corruption import corrupter
    from datasets.shift import OFF
    grey, ramp = np.full((24, 24, 3), 128, np.uint8), np.tile(np.linspace(60, 200, 24).astype(np.uint8), (24, 1))
    ramp = np.repeat(ramp[..., None], 3, -1)
    bright = corrupter({**OFF, "brightness": {"p": 1.0, "magnitude": 0.2}})
    shifts = np.array([bright(grey, s).astype(float).mean() - 128 for s in range(100)])
    assert np.abs(shifts).min() >= 0.1 * 255 - 1 and np.abs(shifts).max() <= 0.2 * 255 + 1
    assert (shifts > 0).any() and (shifts < 0).any()
    contrast = corrupter({**OFF, "contrast": {"p": 1.0, "magnitude": 0.4}})
    factors = np.array([contrast(ramp, s).astype(float).std() / ramp.astype(float).std() for s in range(100)])
    assert (np.abs(factors - 1) >= 0.2 - 0.02).all() and (factors > 1).any() and (factors < 1).any()
    blur = [t for t in matched_ops({**OFF, "blur": {"p": 1.0, "magnitude": 2.0}}, 1.0)][0]
    assert tuple(blur.sigma_limit) == (1.0, 2.0)


@pytest.mark.parametrize("smoothing", ["downscale", "blur"])
def test_a_downscale_is_told_from_a_blur(page_sets, smoothing):
    """Pages shrunk 2 to 3.3 times and stretched back, or blurred about as much: both lose sharpness; the stretched
    ones are linear between their samples, so each is read as what it is, the other reading shown as such, and the
    augmentation draws it."""
    train, test = page_sets
    rng = np.random.default_rng(1)

    def smooth(img):
        if smoothing == "blur":
            return cv2.GaussianBlur(img, (0, 0), 1.5)
        side = int(rng.integers(22, 36))  # a factor of 2 to 3.3, rarely a whole one
        small = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, img.shape[:2][::-1], interpolation=cv2.INTER_LINEAR)
    shift = measure_shift(train, [smooth(img) if rng.random() < 0.6 else img for img in test])
    other = "blur" if smoothing == "downscale" else "downscale"
    s = shift["settings"]
    assert 0.45 <= s[smoothing]["p"] <= 0.75 and s[other]["p"] == 0, describe_shift(shift)
    assert shift["gap"][other].get("read_as") in (None, smoothing)
    if smoothing == "downscale":
        assert 2.4 <= s["downscale"]["magnitude"] <= 4.5 and "-> off (read as downscale)" in describe_shift(shift)
        ops = {type(t).__name__: t for t in matched_ops(s, 1.0)}
        assert ops["Downscale"].scale_range[0] == pytest.approx(1 / s["downscale"]["magnitude"])


def test_noisy_validation_is_corrupted_as_stored_in_the_images_own_units():
    """The validation images are corrupted as the test images were, before the resize: a downscale by 2 at the
    training side of 48 is a downscale by 4 of an image stored at 96; noise keeps its stored strength and grain."""
    from datasets.corruption import corrupter, noisy_copies, stored_units
    from datasets.shift import OFF
    stored = [np.random.default_rng(k).integers(0, 255, (96, 80, 3), dtype=np.uint8) for k in range(3)]
    settings = {**OFF, "downscale": {"p": 1.0, "magnitude": 2.0}, "blur": {"p": 0.5, "magnitude": 1.0},
                "noise": {"p": 0.5, "magnitude": 0.1}, "noise_scale": 0.5}
    as_stored = stored_units(settings, 2.0)
    assert as_stored["downscale"]["magnitude"] == 4.0 and as_stored["blur"]["magnitude"] == 2.0
    assert as_stored["noise"]["magnitude"] == 0.2 and as_stored["noise_scale"] == 1.0
    assert stored_units(settings, 0.5)["downscale"] == OFF["downscale"]  # the resize to a smaller side did it
    copies = noisy_copies(stored, ["a", "b", "c"], settings, 48)
    assert [c.shape for c in copies] == [(96, 80, 3)] * 3
    assert np.array_equal(copies[0], corrupter(as_stored)(stored[0], image_seed("a")))  # fixed per image
