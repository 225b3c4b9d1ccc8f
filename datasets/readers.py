"""Reading a data source into a Data: the bundled digits, an ImageFolder tree or a competition folder (train.csv).
Usage: data = load_data(cfg.data, image_col="ID", label_col="target", group_col="")
"""
from collections import Counter
from pathlib import Path

import numpy as np

from datasets.files import IMAGE_EXTS, Data, read_csv
from utils import UserError


def check_source(source: str) -> None:
    """--data names the bundled digits, a W&B dataset artifact (wandb:...) or a folder that exists; else a UserError
    (before any run folder or W&B run exists)."""
    if source not in ("digits", "digits_hard") and not source.startswith("wandb:") and not Path(source).is_dir():
        raise UserError(f"--data {source}: not 'digits' and not a folder (nor 'digits_hard')")


def load_data(source: str, image_col: str = "ID", label_col: str = "target", group_col: str = "",
              skip_bad: bool = False) -> Data:
    """skip_bad: training rows whose file is missing pass here; screen_images drops them."""
    if source in ("digits", "digits_hard"):
        # imported here, not at the top: `python -m datasets.digits` (the export) must not find itself imported
        from datasets.digits import load_digits_data
        return load_digits_data(hard=source == "digits_hard")
    check_source(source)
    root = Path(source)
    if (root / "train.csv").is_file():
        return _load_csv(root, image_col, label_col, group_col, skip_bad)
    if group_col:
        raise UserError(f"--group_col {group_col!r} needs a train.csv; {root} is an ImageFolder tree")
    return _load_image_folder(root)


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
        data.submission_template = (sample_header, sample_rows)
        _check_files(data.test_items, f"images in {sample_csv}")
    elif test_dir.is_dir():
        data.test_items = _list_images(test_dir)
        data.test_ids = [p.name for p in data.test_items]
        data.submission_columns = (image_col, label_col)
    return data


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


VAL_DIRS = ("val", "valid")  # an ImageFolder's own validation split beside train/ (timm's and Ultralytics' layout)


def _class_folders(folder: Path, skip=("test",)) -> list[str]:
    """The class folders of an ImageFolder tree ("test" is the test set; hidden folders are not classes)."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in skip and not d.name.startswith("."))


def _labelled_images(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    items, labels = [], []
    for i, name in enumerate(classes):
        files = _list_images(folder / name) if (folder / name).is_dir() else []
        items += files
        labels += [i] * len(files)
    return items, labels


def _load_image_folder(root: Path) -> Data:
    vals = [root / v for v in VAL_DIRS if (root / v).is_dir()]
    train_dir = root / "train" if (root / "train").is_dir() else root
    if vals and train_dir == root:
        raise UserError(f"{root}: class folders beside {vals[0].name}/ is ambiguous; put the training classes under "
                        f"{root}/train/<class>/ (the train/ + {vals[0].name}/ layout), or rename {vals[0].name}/ if "
                        f"it is a class")
    if len(vals) > 1:
        raise UserError(f"{root}: both val/ and valid/; keep the one that is the validation split")
    classes = _class_folders(train_dir)
    if not classes:
        raise UserError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image> or a train.csv")
    for name in classes:
        if not _list_images(train_dir / name):
            raise UserError(f"{train_dir / name}: class {name!r} has no images ({sorted(IMAGE_EXTS)})")
    items, labels = _labelled_images(train_dir, classes)
    ids = [str(p.relative_to(train_dir)) for p in items]
    given_val = None
    if vals:
        if unknown := sorted(set(_class_folders(vals[0], skip=())) - set(classes)):
            raise UserError(f"{vals[0]}: class folders {unknown} are not training classes {classes}")
        val_items, val_labels = _labelled_images(vals[0], classes)
        if not val_items:
            raise UserError(f"{vals[0]}: no images under {vals[0]}/<class>/")
        given_val = np.r_[np.zeros(len(items), bool), np.ones(len(val_items), bool)]
        items, labels = items + val_items, labels + val_labels
        ids += [str(p.relative_to(root)) for p in val_items]
    data = Data(classes=classes, targets=list(classes), items=items, labels=np.array(labels, dtype=np.int64),
                ids=ids, given_val=given_val)

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

