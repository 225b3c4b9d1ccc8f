"""Labelled images in, train/val/test datasets out. Usage:
    data = load_data(cfg.data, image_col=..., label_col=..., group_col=...)
    train_idx, val_idx = split_indices(data.labels, data.groups, val_fraction=0.2, folds=0, fold=0, seed=42)
    ds = ImageDataset(data.items, data.labels, transform)

Sources: "digits" (scikit-learn's bundled digits, see datasets/digits.py), an ImageFolder tree
(PATH/<class>/* or PATH/train/<class>/* with optional PATH/test/), or a competition folder
(PATH/train.csv + PATH/train/, optional meta.csv, sample_submission.csv and PATH/test/).
"""
import os

# albumentations 2.x asks pypi.org for a newer version on every import (each run, each spawned loader worker):
# a network call at run time, and a warning on every run of an offline GPU server. Off unless the user sets it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# (set before the imports below, which import albumentations)

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from torchsampler import ImbalancedDatasetSampler

from datasets.cache import cache_images

# the package face: the names the rest of the repo imports from `datasets`
from datasets.files import IMAGE_EXTS, Data, load_image, read_csv, take, unreadable, write_csv  # noqa: F401
from utils import UserError
from utils.registry import Registry
from utils.stop import check_stop, stop_requested


def load_data(source: str, image_col: str = "ID", label_col: str = "target", group_col: str = "",
              skip_bad: bool = False) -> Data:
    """skip_bad: training rows whose file is missing pass here; screen_images drops them."""
    if source in ("digits", "digits_hard"):
        # imported here, not at the top: `python -m datasets.digits` (the export) must not find itself imported
        from datasets.digits import load_digits_data
        return load_digits_data(hard=source == "digits_hard")
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"--data {source}: not 'digits' and not a folder (nor 'digits_hard')")
    if (root / "train.csv").is_file():
        return _load_csv(root, image_col, label_col, group_col, skip_bad)
    if group_col:
        raise UserError(f"--group_col {group_col!r} needs a train.csv; {root} is an ImageFolder tree")
    return _load_image_folder(root)


def screen_images(data: Data, skip_bad: bool, cache: str = "none", img_size: int = 0, cache_dir=None,
                  cache_max_gb: float = 0.0) -> list[str]:
    """Decode every image once before training, so a corrupt, truncated or missing file fails now, by
    name, not inside a DataLoader worker. skip_bad drops bad training images (their ids are returned);
    a bad test image is always an error (its row belongs in the submission). cache "ram" or "disk"
    (auto: ram for in-memory data, else disk) keeps the decoded images at img_size (datasets/cache.py)
    and puts them in data.items and data.test_items in place of the paths; cache_max_gb bounds the disk
    caches of cache_dir together (0 = auto)."""
    test_items = data.test_items or []
    if cache == "auto":
        cache = "ram" if all(isinstance(i, np.ndarray) for i in data.items) else "disk"
    if cache == "none":
        def check(item):  # a stop leaves the rest unchecked (utils/stop.py)
            return None if stop_requested() else unreadable(item)
        with ThreadPoolExecutor(8) as pool:
            bad_train = {i: why for i, why in enumerate(pool.map(check, data.items)) if why}
            bad_test = {i: why for i, why in enumerate(pool.map(check, test_items)) if why}
        check_stop("checking the images")
        items, test = data.items, data.test_items
    else:
        items, bad_train = cache_images(data.items, img_size, cache, cache_dir, max_gb=cache_max_gb)
        test, bad_test = (cache_images(test_items, img_size, cache, cache_dir, max_gb=cache_max_gb) if test_items
                          else (None, {}))
    if bad_test:
        raise UserError(f"{len(bad_test)} test image(s) cannot be read, e.g. "
                        f"{[f'{test_items[i]} ({why})' for i, why in list(bad_test.items())[:3]]}; replace them")
    if bad_train and not skip_bad:
        raise UserError(f"{len(bad_train)} training image(s) cannot be read, e.g. "
                        f"{[f'{data.items[i]} ({why})' for i, why in list(bad_train.items())[:3]]}; replace them, or "
                        f"pass --skip_bad_images True to train without them")
    data.items, data.test_items = items, test
    skipped = [data.ids[i] for i in bad_train]
    if bad_train:
        data.drop(bad_train)
    empty = [c for c, n in zip(data.classes, np.bincount(data.labels, minlength=len(data.classes))) if n == 0]
    if empty:
        raise UserError(f"class(es) {empty} have no training image{' left' if skipped else ''}; add images or "
                        f"remove the class from meta.csv")
    return skipped


def _require_columns(path: Path, header: list[str], wanted: dict[str, str]) -> None:
    """wanted: column -> where its name comes from, for the message."""
    for col, source in wanted.items():
        if col and col not in header:
            raise UserError(f"{path}: no column {col!r} ({source}); columns are {header}")


def _labels(train_csv: Path, rows: list[dict], image_col: str, label_col: str) -> list[str]:
    """The label column, each label stripped of surrounding spaces (said once when any had them). An empty label
    and an image listed twice are errors naming the lines (and both labels when they differ): training on both or
    on a class named "" would pass silently."""
    raw = [r[label_col].strip() for r in rows]
    if empty := [n + 2 for n, v in enumerate(raw) if not v]:  # +2: header line, 1-based
        raise UserError(f"{train_csv}: empty {label_col!r} on line(s) {empty[:10]}; give those rows a label or "
                        f"remove them")
    first: dict[str, int] = {}
    repeated = []
    for n, r in enumerate(rows):
        if (seen := first.setdefault(r[image_col], n)) != n:
            repeated.append(f"{r[image_col]!r} on lines {seen + 2} and {n + 2}"
                            + (f" as {raw[seen]!r} and {raw[n]!r}" if raw[seen] != raw[n] else ""))
    if repeated:
        raise UserError(f"{train_csv}: {len(repeated)} image(s) listed more than once in {image_col!r}: "
                        f"{'; '.join(repeated[:5])}; keep one row per image (with its right label)")
    if padded := [n + 2 for n, r in enumerate(rows) if r[label_col] != raw[n]]:
        print(f"note: {train_csv}: {len(padded)} label(s) had spaces around them and were read without them "
              f"(line(s) {padded[:5]}), so ' cat' and 'cat' are one class")
    return raw


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _image_dir(root: Path, sub: str) -> Path:
    return root / sub if (root / sub).is_dir() else root


def _check_files(paths: list[Path], what: str, allow_missing: bool = False) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing and not allow_missing:
        raise UserError(f"{len(missing)} {what} listed but missing, e.g. {missing[:3]}; "
                        "fix the CSV or the image folder (training images: or pass --skip_bad_images True)")


def _load_csv(root: Path, image_col: str, label_col: str, group_col: str, skip_bad: bool = False) -> Data:
    train_csv = root / "train.csv"
    header, rows = read_csv(train_csv)
    _require_columns(train_csv, header, {image_col: "set by --image_col", label_col: "set by --label_col",
                                         group_col: "set by --group_col"})
    if not rows:
        raise UserError(f"{train_csv} has no rows")
    raw = _labels(train_csv, rows, image_col, label_col)

    meta_csv = root / "meta.csv"
    if meta_csv.is_file():  # target -> class_name, in target order
        meta_header, meta_rows = read_csv(meta_csv)
        _require_columns(meta_csv, meta_header,
                         {label_col: "set by --label_col", "class_name": "meta.csv maps labels to names"})
        meta_rows.sort(key=lambda r: int(r[label_col]) if _is_int(r[label_col]) else r[label_col])
        targets = [int(r[label_col]) if _is_int(r[label_col]) else r[label_col] for r in meta_rows]
        classes = [r["class_name"] for r in meta_rows]
    elif all(_is_int(v) for v in raw):
        targets = sorted({int(v) for v in raw})
        classes = [str(t) for t in targets]
    else:
        targets = sorted(set(raw))
        classes = list(targets)
    index = {str(t): i for i, t in enumerate(targets)} | {name: i for i, name in enumerate(classes)}
    bad = [(n + 2, v) for n, v in enumerate(raw) if v not in index]  # +2: header line, 1-based
    if bad:
        raise UserError(f"{train_csv}: label(s) not among the classes {classes}: "
                        f"{bad[:5]} (line, value); fix the labels or meta.csv")
    labels = np.array([index[v] for v in raw], dtype=np.int64)

    image_dir = _image_dir(root, "train")
    items = [image_dir / r[image_col] for r in rows]
    _check_files(items, f"images in {train_csv}", allow_missing=skip_bad)
    groups = np.array([r[group_col] for r in rows]) if group_col else None
    data = Data(classes=classes, targets=targets, items=items, labels=labels,
                ids=[r[image_col] for r in rows], groups=groups)

    sample_csv, test_dir = root / "sample_submission.csv", root / "test"
    if sample_csv.is_file():
        sample_header, sample_rows = read_csv(sample_csv)
        id_col = image_col if image_col in sample_header else sample_header[0]
        target_col = label_col if label_col in sample_header else sample_header[-1]
        data.test_ids = [r[id_col] for r in sample_rows]
        if repeated := [i for i, n in Counter(data.test_ids).items() if n > 1]:
            raise UserError(f"{sample_csv}: id(s) listed more than once in column {id_col!r}: {repeated[:5]}; "
                            f"each test image must appear once")
        data.test_items = [_image_dir(root, "test") / i for i in data.test_ids]
        data.submission_columns = (id_col, target_col)
        _check_files(data.test_items, f"images in {sample_csv}")
    elif test_dir.is_dir():
        data.test_items = _list_images(test_dir)
        data.test_ids = [p.name for p in data.test_items]
        data.submission_columns = (image_col, label_col)
    return data


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _load_image_folder(root: Path) -> Data:
    train_dir = root / "train" if (root / "train").is_dir() else root
    # "test" is the test set, hidden folders (.ipynb_checkpoints) are not classes
    classes = sorted(d.name for d in train_dir.iterdir()
                     if d.is_dir() and d.name != "test" and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image> or a train.csv")
    items, labels = [], []
    for i, name in enumerate(classes):
        files = _list_images(train_dir / name)
        if not files:
            raise UserError(f"{train_dir / name}: class {name!r} has no images ({sorted(IMAGE_EXTS)})")
        items += files
        labels += [i] * len(files)
    data = Data(classes=classes, targets=list(classes), items=items, labels=np.array(labels, dtype=np.int64),
                ids=[str(p.relative_to(train_dir)) for p in items])

    test_dir = root / "test"
    if test_dir.is_dir():
        sub = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if sub:  # labelled test folder: test/<class>/*
            unknown = sorted(set(sub) - set(classes))
            if unknown:
                raise UserError(f"{test_dir}: class folders {unknown} are not training classes {classes}")
            pairs = [(p, classes.index(c)) for c in sub for p in _list_images(test_dir / c)]
            data.test_items = [p for p, _ in pairs]
            data.test_labels = np.array([y for _, y in pairs], dtype=np.int64)
        else:
            data.test_items = _list_images(test_dir)
        data.test_ids = [str(p.relative_to(test_dir)) for p in data.test_items]
    return data


def split_indices(labels: np.ndarray, groups: np.ndarray | None, val_fraction: float,
                  folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices, deterministic given seed; with groups, no group is in both."""
    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    if groups is None and folds == 0:
        stratify = labels if counts[counts > 0].min() >= 2 else None
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=stratify, random_state=seed)
        return np.sort(train_idx), np.sort(val_idx)
    n_splits = folds or max(2, round(1 / val_fraction))
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = list(splitter.split(idx, labels, groups))[fold if folds else 0]
    return train_idx, val_idx


class ImageDataset(torch.utils.data.Dataset):
    """Yields (image tensor, label or -1, index). A key (index, seed) seeds the augmentation of that
    one sample, so the same seed gives the same batches whatever the number of workers."""

    def __init__(self, items: list, labels: np.ndarray | None, transform):
        self.items, self.labels, self.transform = items, labels, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            self.transform.set_random_seed(seed)
        image = self.transform(image=load_image(self.items[index]))["image"]
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label, index


class SeededSampler(torch.utils.data.Sampler):
    """The epoch's order from a generator seeded by (seed, epoch), each position paired with an
    augmentation seed drawn from (seed, epoch, position). With `weights`, draws n indices with
    replacement in proportion to them (the imbalanced sampler); else a permutation.
    Under torchrun (world > 1) rank r yields positions r, r + world, ... of that same order, each
    rank n // world of them: with batch_size / world per rank, the ranks' batches together are the
    one-process run's batches of batch_size (with drop_last), augmentation seeds included."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch, self.weights, self.rank, self.world = n, seed, 0, weights, rank, world
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """skip: this rank's first `skip` positions are left out (an epoch resumed after a stop inside it)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.n // self.world - self.skip)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.weights is None else \
            torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        order = order.tolist()
        for k in range(self.rank + self.skip * self.world, self.n // self.world * self.world, self.world):
            yield order[k], int(np.random.SeedSequence([self.seed, self.epoch, k]).generate_state(1)[0])


SAMPLERS = Registry("sampler")


def build_sampler(name: str, labels: np.ndarray, seed: int, rank: int = 0, world: int = 1) -> SeededSampler:
    sampler = SAMPLERS.build(name, labels, seed)
    sampler.rank, sampler.world = rank, world
    return sampler


@SAMPLERS.register("random")
def random_sampler(labels, seed):
    """Each training image once per epoch, shuffled."""
    return SeededSampler(len(labels), seed)


@SAMPLERS.register("imbalanced")
def imbalanced_sampler(labels, seed):
    """torchsampler's ImbalancedDatasetSampler weights (1 / class count), from the labels array itself so
    it works on any subset or fold; drawn with replacement, every class equally often on average."""
    weights = ImbalancedDatasetSampler(labels, labels=[int(y) for y in labels]).weights
    return SeededSampler(len(labels), seed, weights)


def write_submission(path: Path, data: Data, pred: np.ndarray) -> None:
    """ID,target rows in the order of data.test_ids (the sample submission's order where there is one)."""
    write_csv(path, data.submission_columns, ((i, data.targets[p]) for i, p in zip(data.test_ids, pred)))


def write_oof(path: Path, data: Data, probs: np.ndarray, folds: np.ndarray) -> None:
    """Out-of-fold probabilities of every labelled image: id, label, fold, p_<class>..."""
    write_csv(path, ["id", "label", "fold"] + [f"p_{c}" for c in data.classes],
              ([i, data.classes[y], f, *(f"{p:.6g}" for p in row)]
               for i, y, f, row in zip(data.ids, data.labels, folds, probs)))
