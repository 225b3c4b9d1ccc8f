"""Loading: CSV with int and name labels, ImageFolder, image modes, splits, seeded augmentation."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NAMES, ROOT, make_competition_folder
from datasets import ImageDataset, SeededSampler, load_data, load_image, split_indices, write_submission
from datasets.transforms import AUGS, eval_transform, seed_pipeline, with_augmix
from utils import UserError


def test_csv_int_labels_with_meta(competition):
    data = load_data(str(competition))
    assert data.classes == NAMES and data.targets == list(range(10))
    with open(competition / "train.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["target"]) for r in rows] == data.labels.tolist()
    assert data.ids[0] == rows[0]["ID"] and data.items[0] == competition / "train" / rows[0]["ID"]
    assert len(data.test_ids) == 40 and data.test_labels is None
    names = [NAMES[int(r["target"])] for r in rows]  # the same labels written as class names
    (competition / "train.csv").write_text("ID,target\n" + "".join(f"{r['ID']},{n}\n" for r, n in zip(rows, names)))
    assert load_data(str(competition)).labels.tolist() == data.labels.tolist()


def test_the_submission_keeps_every_column_of_the_sample_submission(competition, tmp_path):
    sample = competition / "sample_submission.csv"
    with open(sample) as fh:
        rows = list(csv.DictReader(fh))
    with open(sample, "w", newline="") as fh:  # a Usage column before the target, as some leaderboards give
        csv.writer(fh).writerows([["ID", "Usage", "target"]] + [[r["ID"], f"u{n % 2}", 0] for n, r in enumerate(rows)])
    data = load_data(str(competition))
    write_submission(tmp_path / "submission.csv", data, np.arange(len(data.test_ids)) % 10)
    with open(tmp_path / "submission.csv") as fh:
        written = list(csv.reader(fh))
    assert written[0] == ["ID", "Usage", "target"]
    expected = [(r["ID"], f"u{n % 2}", n % 10) for n, r in enumerate(rows)]
    assert [(r[0], r[1], int(r[2])) for r in written[1:]] == expected


def test_csv_name_labels_without_meta(tmp_path):
    root = make_competition_folder(tmp_path / "c", n_train=60, n_test=5, name_labels=True, with_meta=False)
    data = load_data(str(root))
    assert data.classes == sorted(NAMES) and data.targets == sorted(NAMES)
    with open(root / "train.csv") as fh:
        names = [r["target"] for r in csv.DictReader(fh)]
    assert [data.classes[i] for i in data.labels] == names
    write_submission(tmp_path / "sub.csv", data, np.arange(5))
    with open(tmp_path / "sub.csv") as fh:
        sub = list(csv.DictReader(fh))
    assert [r["target"] for r in sub] == sorted(NAMES)[:5]  # a submission speaks the CSV's label language


def test_csv_errors_name_the_problem(tmp_path):
    root = make_competition_folder(tmp_path / "c", n_train=30, n_test=3)
    with pytest.raises(UserError, match="no column 'label'.*--label_col"):
        load_data(str(root), label_col="label")
    rows = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(rows[:5] + [rows[5].split(",")[0] + ",42"] + rows[6:]) + "\n")
    with pytest.raises(UserError, match=r"\(6, '42'\)"):
        load_data(str(root))
    (root / "train.csv").write_text("\n".join(rows[:5] + ["missing.png,3"] + rows[6:]) + "\n")
    with pytest.raises(UserError, match="missing.png"):
        load_data(str(root))


def _write_images(folder, n, size=(20, 24)):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((*size, 3), 40 * i % 255, np.uint8)).save(folder / f"im{i}.png")


def test_an_image_folder_with_train_and_val_uses_that_split(tmp_path):
    """The timm and Ultralytics layout: train/<class>/ and val/<class>/ (or valid/); val/ is the holdout."""
    for c, (n_train, n_val) in {"cat": (4, 2), "dog": (5, 1)}.items():
        _write_images(tmp_path / "tv" / "train" / c, n_train)
        _write_images(tmp_path / "tv" / "val" / c, n_val)
    data = load_data(str(tmp_path / "tv"))
    assert data.classes == ["cat", "dog"] and len(data.items) == 12 and data.given_val.sum() == 3
    train_idx, val_idx = split_indices(data.labels, data.groups, 0.2, 0, 0, 42, data.given_val)
    assert sorted(data.ids[i] for i in val_idx) == ["val/cat/im0.png", "val/cat/im1.png", "val/dog/im0.png"]
    assert len(train_idx) == 9 and len(split_indices(data.labels, None, 0.2, 3, 0, 42, data.given_val)[1]) == 4
    data.drop([0])  # screening drops an undecodable image: the split follows
    assert len(data.given_val) == 11 and data.given_val.sum() == 3
    _write_images(tmp_path / "tv" / "val" / "fox", 1)
    with pytest.raises(UserError, match=r"class folders \['fox'\] are not training classes"):
        load_data(str(tmp_path / "tv"))
    for c in ("cat", "val"):  # a flat tree beside val/: ambiguous, not a class named val
        _write_images(tmp_path / "flatval" / c / "x", 1) if c == "val" else _write_images(tmp_path / "flatval" / c, 2)
    with pytest.raises(UserError, match="ambiguous"):
        load_data(str(tmp_path / "flatval"))


def test_image_folder_flat_and_with_test(tmp_path):
    for c, n in [("cat", 3), ("dog", 4)]:
        _write_images(tmp_path / "flat" / c, n)
        _write_images(tmp_path / "split" / "train" / c, n)
    _write_images(tmp_path / "split" / "test", 5)
    (tmp_path / "flat" / ".ipynb_checkpoints").mkdir()
    flat = load_data(str(tmp_path / "flat"))
    assert flat.classes == ["cat", "dog"] and flat.labels.tolist() == [0] * 3 + [1] * 4 and flat.test_items is None
    split = load_data(str(tmp_path / "split"))
    assert split.classes == ["cat", "dog"] and len(split.items) == 7
    assert split.test_ids == [f"im{i}.png" for i in range(5)] and split.test_labels is None
    for c, n in [("cat", 2), ("dog", 1)]:
        _write_images(tmp_path / "split" / "test_labelled" / c, n)
    (tmp_path / "split" / "test").rename(tmp_path / "split" / "test_flat")
    (tmp_path / "split" / "test_labelled").rename(tmp_path / "split" / "test")
    labelled = load_data(str(tmp_path / "split"))
    assert labelled.test_labels.tolist() == [0, 0, 1] and labelled.test_ids[0] == "cat/im0.png"
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(UserError, match="'empty' has no images"):
        load_data(str(tmp_path / "flat"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("im.tif" if mode in ("I;16", "CMYK") else "im.png")
    Image.new("RGB", (10, 7), (200, 30, 90)).convert(mode).save(path)
    image = load_image(path)
    assert image.shape == (7, 10, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("name,array", [
    ("16-bit", np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)),  # a 12-bit sensor's values
    ("32-bit", np.array([[-70000, 0], [70000, 140000]], dtype=np.int32)),
    ("float", np.array([[0.5, 1.25], [2.0, 2.75]], dtype=np.float32)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_wide_images_are_rescaled_by_their_range_not_clipped(tmp_path, name, array):
    path = tmp_path / f"{name}.tif" if name != "16-bit" else tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I", "F")  # what PIL's convert("RGB") clips at 255
    image = load_image(path)
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    values = array.astype(np.float64)
    expected = np.round((values - values.min()) * 255 / (values.max() - values.min()))
    assert np.array_equal(image[..., 0], expected.astype(np.uint8)) and (image[..., 0] == image[..., 2]).all()


def test_group_split_never_leaks_and_is_deterministic(tmp_path):
    root = make_competition_folder(tmp_path / "c", n_train=240, n_test=2, groups=True)
    data = load_data(str(root), group_col="group")
    for folds, fold in [(0, 0), (4, 2)]:
        tr, va = split_indices(data.labels, data.groups, 0.25, folds, fold, seed=3)
        assert not set(data.groups[tr]) & set(data.groups[va])
        assert len(tr) + len(va) == 240 and len(va) > 0
        again = split_indices(data.labels, data.groups, 0.25, folds, fold, seed=3)
        assert np.array_equal(tr, again[0]) and np.array_equal(va, again[1])
    folds = [split_indices(data.labels, data.groups, 0.2, 4, k, seed=0)[1] for k in range(4)]
    assert sorted(np.concatenate(folds).tolist()) == list(range(240))  # the K folds partition the data


def test_holdout_is_stratified():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    tr, va = split_indices(labels, None, 0.2, 0, 0, seed=0)
    assert np.bincount(labels[va]).tolist() == [20, 10, 6, 4]
    assert not set(tr) & set(va)
    assert not np.array_equal(va, split_indices(labels, None, 0.2, 0, 0, seed=1)[1])


def test_digits_test_split_is_noisy():
    data = load_data("digits")
    assert len(data.items) + len(data.test_items) == 1797
    assert data.items[0].shape == data.test_items[0].shape == (64, 64, 3)
    clean_bg = np.mean([im[:4, :4].std() for im in data.items])
    noisy_bg = np.mean([im[:4, :4].std() for im in data.test_items])
    assert noisy_bg > clean_bg + 5  # Gaussian noise and colour shift reach the background
    assert np.bincount(data.test_labels).min() >= 30


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("preset", sorted(AUGS))
def test_presets_give_model_ready_tensors(preset, strength):
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    out = AUGS[preset](40, strength, (0.5,) * 3, (0.5,) * 3)(image=image)["image"]
    assert out.shape == (3, 40, 40) and out.dtype == torch.float32
    ref = eval_transform(40, (0.5,) * 3, (0.5,) * 3)(image=image)["image"]
    assert ref.min() >= -1 and ref.max() <= 1


def test_augmix_changes_images_and_zero_leaves_the_pipeline_as_it_was():
    image = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    plain = AUGS["none"](24, 1.0, (0.5,) * 3, (0.5,) * 3)
    assert with_augmix(plain, 0.0) is plain
    mixed = with_augmix(plain, 1.0)
    outs = []
    for seed in (1, 1, 2):
        seed_pipeline(mixed, seed)
        outs.append(mixed(image=image)["image"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])  # seeded by the pipeline
    assert not torch.equal(outs[0], plain(image=image)["image"])


@pytest.mark.parametrize("augmix", [0.0, 1.0])
def test_augmentation_is_seeded_per_sample_not_per_worker(augmix):
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(12)]
    tf = with_augmix(AUGS["test_noise"](24, 1.0, (0.5,) * 3, (0.5,) * 3), augmix)
    ds = ImageDataset(items, np.zeros(12, dtype=np.int64), tf)

    def batches(workers, epoch, weights=None):
        sampler = SeededSampler(len(ds), seed=7, weights=weights)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers)
        return [(x, i) for x, _, i in loader]

    for (x0, i0), (x2, i2) in zip(batches(0, 1), batches(2, 1)):
        assert torch.equal(i0, i2) and torch.equal(x0, x2)
    weights = torch.linspace(0.1, 1, 12, dtype=torch.float64)  # a weighted draw (the imbalanced sampler) too
    for (x0, i0), (x2, i2) in zip(batches(0, 1, weights), batches(2, 1, weights)):
        assert torch.equal(i0, i2) and torch.equal(x0, x2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches(0, 1), batches(0, 2)))  # reshuffled per epoch


def test_a_seeded_sample_draws_its_operations_independently():
    """Two operations of the same probability, seeded per sample as the loader and the noisy validation seed them:
    every combination of the two occurs (albumentations' own per-seed seeding gave both operations the same stream:
    both applied or neither). The corruption the measure finds is drawn the same way."""
    import albumentations as A

    from datasets.corruption import corrupter
    from datasets.shift import OFF
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    views = {(k, m): np.rot90(image[:, ::-1] if m else image, k) for k in range(4) for m in (0, 1)}

    def combos(outputs):
        seen = [next(km for km, v in views.items() if np.array_equal(v, out)) for out in outputs]
        return {(k > 0, m): sum((kk > 0, mm) == (k > 0, m) for kk, mm in seen) / len(seen)
                for k in (0, 1) for m in (0, 1)}
    ds = ImageDataset([image], None, A.Compose([A.RandomRotate90(p=0.5), A.HorizontalFlip(p=0.5)]))
    shares = combos(ds[(0, seed)][0] for seed in range(400))
    assert all(share > 0.1 for share in shares.values()), shares  # turned 3/8, mirrored 1/2, independently
    apply = corrupter({**OFF, "turn": {"p": 0.5}, "flip": {"p": 0.5}})
    shares = combos(apply(image, seed) for seed in range(400))
    assert all(share > 0.1 for share in shares.values()), shares


def test_importing_the_entry_points_opens_no_connection():
    """No network at run time: albumentations 2.x asks pypi.org for updates on import unless told not to."""
    probe = ("import socket\n"
             "calls = []\n"
             "def refuse(host, *a, **k):\n"
             "    calls.append(host)\n"
             "    raise OSError('no network in this test')\n"
             "socket.getaddrinfo = refuse\n"
             "import train, predict, ensemble, eda, sweep, register, journal, bench\n"
             "print(calls)\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]" and "Error fetching version" not in proc.stderr
