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


def listed_twice(new_label):
    """tr_0005.png listed again at the end, with new_label (None: its own label again)."""
    def change(root: Path) -> None:
        lines = (root / "train.csv").read_text().splitlines()
        name, first = lines[6].split(",")
        lines.append(f"{name},{first if new_label is None else new_label}")
        (root / "train.csv").write_text("\n".join(lines) + "\n")
    return change


def sample_id_twice(root: Path) -> None:
    with open(root / "sample_submission.csv") as fh:
        first = fh.read().splitlines()[1]
    with open(root / "sample_submission.csv", "a") as fh:
        fh.write(first + "\n")


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
    ("empty label", label(""), [], 1, "empty 'target' on line(s) [7]"),
    ("whitespace label", label("   "), [], 1, "empty 'target' on line(s) [7]"),
    ("image listed twice, two labels", listed_twice(3), [], 1, "on lines 7 and 42 as"),
    ("image listed twice, one label", listed_twice(None), [], 1, "listed more than once in 'ID'"),
    ("test id listed twice", sample_id_twice, [], 1, "listed more than once in column 'ID'"),
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
    # work from an earlier run in the same folder, one stopped in its first epoch (a folder with a finished run's
    # best.safetensors is refused before the data is read: tests/test_rerun.py)
    earlier = out_dir / "last.safetensors"
    earlier.write_bytes(b"earlier checkpoint")
    try:
        got = train.main(["--data", str(root), *BASE, *extra, "--out_dir", str(out_dir)])
    except SystemExit as e:  # argparse: usage line + error
        got = e.code
    err = capsys.readouterr().err
    assert got == code and fragment in err and "Traceback" not in err, err
    assert earlier.read_bytes() == b"earlier checkpoint" and sorted(p.name for p in out_dir.glob("*.safetensors")) == [
        "last.safetensors"]


def test_skip_bad_images_trains_without_them_and_says_which(tmp_path):
    root = make_competition_folder(tmp_path / "comp", n_train=40, n_test=6)
    corrupt(root)
    unlisted_file(root)
    out_dir = tmp_path / "out"
    assert train.main(["--data", str(root), *BASE, "--skip_bad_images", "True", "--out_dir", str(out_dir)]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert sorted(summary["skipped_images"]) == ["gone.png", "tr_0003.png"]
    assert (out_dir / "best.safetensors").is_file()


@pytest.mark.parametrize("text,fragment", [
    ("lr: 0.01\nepochs: [3\n", "line 3 is not YAML"),
    ("lr: 0.01\n\tepochs: 3\n", "line 2 is not YAML"),
    ("optimizer:\n  name: adamw\n", "['optimizer'] hold a mapping; the config is flat"),
], ids=["unclosed list", "tab", "nested"])
def test_a_config_file_that_is_not_flat_yaml_is_one_error_naming_it(tmp_path, capsys, text, fragment):
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(config), "--data", "digits"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--config {config}:" in err and fragment in err and "Traceback" not in err, err


def test_labels_with_spaces_around_them_are_one_class_and_said(tmp_path, capsys):
    from datasets import load_data
    root = make_competition_folder(tmp_path / "comp", n_train=40, n_test=6)
    lines = (root / "train.csv").read_text().splitlines()
    name, value = lines[6].split(",")
    lines[6] = f"{name}, {value} "
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    data = load_data(str(root))
    assert len(data.classes) == 10 and "1 label(s) had spaces around them" in capsys.readouterr().out


def test_a_run_folder_in_use_or_unwritable_is_one_error_line(tmp_path, capsys):
    """The same command started twice into one --out_dir: the second must not resume into the folder the first is
    still writing (it names the first's pid); a folder that cannot be written: one line, not a traceback."""
    import subprocess
    import sys

    from conftest import ROOT
    out_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.runs import claimed\n"
                              f"with claimed({str(out_dir)!r}):\n    print('held', flush=True); time.sleep(60)"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)  # the first run, alive
    try:
        assert first.stdout.readline().strip() == "held"
        assert train.main(["--data", "digits", *BASE, "--out_dir", str(out_dir)]) == 1
    finally:
        first.kill()
        first.wait()
    err = capsys.readouterr().err
    assert f"--out_dir {out_dir} is in use by a run still going (process {first.pid})" in err
    assert "Traceback" not in err and not (out_dir / "run.json").exists()
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder's parent should be")
    assert train.main(["--data", "digits", *BASE, "--out_dir", str(blocked / "run")]) == 1
    assert f"--out_dir {blocked / 'run'} cannot be written" in capsys.readouterr().err
