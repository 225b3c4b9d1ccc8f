"""Suspect labels: labels flipped on purpose rank at the top of a cross-validated run's suspect list,
and the edited list relabels or drops training images by id."""
import csv

import numpy as np
import pytest

from conftest import TINY_MODEL, make_competition_folder, run_train
from datasets import load_data
from utils import UserError
from workflows.label_errors import apply_label_fixes

FLIPPED = 30


def write_fixes(path, rows, header=("id", "given", "new_label")):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([list(header), *rows])
    return path


def test_fixes_relabel_and_exclude_by_id(competition, tmp_path):
    data = load_data(str(competition))
    before = dict(zip(data.ids, data.labels))
    fixes = write_fixes(tmp_path / "fixes.csv", [["tr_0001.png", "x", "seven"], ["tr_0002.png", "x", "exclude"],
                                                 ["tr_0003.png", "x", ""], ["tr_0004.png", "x", "3"]])
    assert apply_label_fixes(data, str(fixes)) == (2, 1)
    after = dict(zip(data.ids, data.labels))
    assert after["tr_0001.png"] == 7 and after["tr_0004.png"] == 3 and "tr_0002.png" not in after
    assert after["tr_0003.png"] == before["tr_0003.png"] and len(data.items) == len(data.labels) == len(before) - 1


@pytest.mark.parametrize("rows,header,fragment", [
    ([["nope.png", "x", "seven"]], ("id", "given", "new_label"), "line 2: id 'nope.png' is not a training image"),
    ([["tr_0001.png", "x", "eleven"]], ("id", "given", "new_label"), "new_label 'eleven' is not a class"),
    ([["tr_0001.png", "seven"]], ("id", "label"), "no column(s) ['new_label']"),
])
def test_bad_fixes_are_named(competition, tmp_path, rows, header, fragment):
    data = load_data(str(competition))
    with pytest.raises(UserError) as e:
        apply_label_fixes(data, str(write_fixes(tmp_path / "f.csv", rows, header)))
    assert fragment in str(e.value)


@pytest.mark.slow
def test_flipped_labels_rank_first_and_fixes_feed_back(tmp_path):
    root = make_competition_folder(tmp_path / "comp", n_train=900, n_test=20)
    with open(root / "train.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    rng = np.random.default_rng(0)
    flipped = set()
    for r in rng.choice(np.arange(1, len(rows)), size=FLIPPED, replace=False):
        rows[r][1] = str((int(rows[r][1]) + rng.integers(1, 10)) % 10)  # another digit, on purpose
        flipped.add(rows[r][0])
    with open(root / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    out = tmp_path / "cv"
    run_train(["--data", str(root), "--cv", "True", "--folds", "3", "--model", TINY_MODEL, "--img_size", "16",
               "--epochs", "4", "--batch_size", "32", "--lr", "0.01", "--workers", "0", "--table_rows", "10",
               "--out_dir", str(out)])
    with open(out / "suspect_labels.csv", newline="") as fh:
        suspects = list(csv.DictReader(fh))
    top = {s["id"] for s in suspects[:2 * FLIPPED]}  # the rows a user would look at first
    recall, precision = len(flipped & top) / FLIPPED, len(flipped & top) / max(len(top), 1)
    print(f"suspect labels: {len(suspects)}; recall {recall:.2f} of the {FLIPPED} flipped, precision {precision:.2f}, "
          f"in the top {len(top)}")
    assert recall >= 0.6
    assert [float(s["self_confidence"]) for s in suspects] == sorted(float(s["self_confidence"]) for s in suspects)

    for s in suspects:  # the user's edit: drop every suspect
        s["new_label"] = "exclude"
    with open(tmp_path / "fixes.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(suspects[0]))
        writer.writeheader()
        writer.writerows(suspects)
    proc = run_train(["--data", str(root), "--model", TINY_MODEL, "--img_size", "32", "--epochs", "1", "--workers", "0",
                      "--wandb_mode", "disabled", "--label_fixes", str(tmp_path / "fixes.csv"),
                      "--out_dir", str(tmp_path / "r")])
    assert f"0 label(s) changed, {len(suspects)} image(s) excluded" in proc.stdout
