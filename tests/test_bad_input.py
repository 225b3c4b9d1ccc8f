"""Every bad input gets one clear error naming the file, field or value, before training, with no
traceback and nothing already saved touched; odd image modes are converted, not refused."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from conftest import TINY_MODEL, make_competition_folder

BASE = ["--model", TINY_MODEL, "--img_size", "32", "--epochs", "1", "--workers", "0", "--wandb_mode", "disabled"]


def corrupt(root: Path) -> None:
    (root / "train" / "tr_0003.png").write_bytes(b"not an image at all")


def truncate(root: Path) -> None:
    path = root / "train" / "tr_0004.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-400])


def unlisted_file(root: Path) -> None:
    text = (root / "train.csv").read_text().replace("tr_0005.png", "gone.png")
    (root / "train.csv").write_text(text)


def label(value):
    def change(root: Path) -> None:
        lines = (root / "train.csv").read_text().splitlines()
        lines[6] = lines[6].split(",")[0] + f",{value}"
        (root / "train.csv").write_text("\n".join(lines) + "\n")
    return change


def class_without_images(root: Path) -> None:
    with open(root / "meta.csv", "a") as fh:
        fh.write("10,ten\n")


def empty_folder(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()


def corrupt_test(root: Path) -> None:
    (root / "test" / "te_0002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


CASES = [  # (name, change to the data folder, extra args, exit code, message fragment)
    ("corrupt image", corrupt, [], 1, "tr_0003.png (UnidentifiedImageError"),
    ("truncated image", truncate, [], 1, "tr_0004.png (OSError"),
    ("listed but missing", unlisted_file, [], 1, "gone.png"),
    ("misnamed label column", None, ["--label_col", "label"], 1, "no column 'label' (set by --label_col)"),
    ("misnamed image column", None, ["--image_col", "file"], 1, "no column 'file' (set by --image_col)"),
    ("label not in meta.csv", label(42), [], 1, "label(s) not among the classes"),
    ("class with no training image", class_without_images, [], 1, "class(es) ['ten'] have no training image"),
    ("empty folder", empty_folder, [], 1, "no class folders"),
    ("corrupt test image", corrupt_test, [], 1, "te_0002.png"),
    ("unknown model", None, ["--model", "resnet_50"], 1, "unknown model 'resnet_50'"),
    ("unknown loss", None, ["--loss", "hinge"], 2, "--loss: invalid choice: 'hinge'"),
    ("unknown optimizer", None, ["--optimizer", "adamm"], 2, "--optimizer: invalid choice: 'adamm'"),
    ("unknown scheduler", None, ["--scheduler", "cosin"], 2, "--scheduler: invalid choice: 'cosin'"),
    ("lr <= 0", None, ["--lr", "0"], 2, "lr must be > 0"),
    ("fold >= folds", None, ["--folds", "3", "--fold", "3"], 2, "fold must satisfy 0 <= fold < folds (3)"),
    ("aug_strength outside [0, 1]", None, ["--aug_strength", "1.5"], 2, "aug_strength must be in [0, 1]"),
    ("batch size 0", None, ["--batch_size", "0"], 2, "batch_size must be > 0"),
]


@pytest.mark.parametrize("name,change,extra,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_nothing_is_lost(tmp_path, capsys, name, change, extra, code, fragment):
    root = make_competition_folder(tmp_path / "comp", n_train=40, n_test=6)
    if change:
        change(root)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    earlier = out_dir / "best.safetensors"  # work from an earlier run in the same folder
    earlier.write_bytes(b"earlier checkpoint")
    try:
        got = train.main(["--data", str(root), *BASE, *extra, "--out_dir", str(out_dir)])
    except SystemExit as e:  # argparse: usage line + error
        got = e.code
    err = capsys.readouterr().err
    assert got == code and fragment in err and "Traceback" not in err, err
    assert earlier.read_bytes() == b"earlier checkpoint" and sorted(p.name for p in out_dir.glob("*.safetensors")) == [
        "best.safetensors"]


def test_skip_bad_images_trains_without_them_and_says_which(tmp_path):
    root = make_competition_folder(tmp_path / "comp", n_train=40, n_test=6)
    corrupt(root)
    unlisted_file(root)
    out_dir = tmp_path / "out"
    assert train.main(["--data", str(root), *BASE, "--skip_bad_images", "True", "--out_dir", str(out_dir)]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert sorted(summary["skipped_images"]) == ["gone.png", "tr_0003.png"]
    assert (out_dir / "best.safetensors").is_file()
