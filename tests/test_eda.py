"""eda.py: duplicates (a resized copy, across train and test; a relabelled copy), the noisy-test gap of
the digits demo, and the run diff on a constructed pair of submissions; read back from W&B's files."""
import csv

import cv2
import numpy as np
import pytest

import eda
from conftest import make_competition_folder, read_run
from datasets import load_data
from workflows.eda import dominant_orientation, near_duplicates, noise_sigma


def summary_of(out_dir):
    summary = {}
    for r in read_run(next((out_dir / "wandb").glob("offline-run-*"))):
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    return summary


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_near_duplicates_and_noise_estimate():
    hashes = np.array([0b1011, 0b1010, 0xFFFF_0000_0000_0000, 0b1011], np.uint64)
    assert near_duplicates(hashes, max_distance=1) == [(0, 3, 0), (0, 1, 1), (1, 3, 1)]
    rng = np.random.default_rng(0)
    flat = np.full((64, 64), 128.0)
    assert noise_sigma(flat) == 0 and abs(noise_sigma(flat + rng.normal(0, 10, flat.shape)) - 10) < 1
    stripes = np.tile((np.arange(64) % 8 < 4) * 255.0, (64, 1))  # vertical stripes: gradients along x
    assert (dominant_orientation(stripes) == pytest.approx(0, abs=1)
            and dominant_orientation(stripes.T) == pytest.approx(0, abs=1))
    turned = cv2.warpAffine(stripes, cv2.getRotationMatrix2D((32, 32), 30, 1.0), (64, 64))[16:48, 16:48]
    assert dominant_orientation(turned) == pytest.approx(30, abs=3)


def test_copies_are_found_across_train_and_test(tmp_path, capsys):
    root = make_competition_folder(tmp_path / "comp", n_train=60, n_test=10)
    original = cv2.imread(str(root / "train" / "tr_0005.png"))
    cv2.imwrite(str(root / "test" / "te_copy.jpg"), cv2.resize(original, (48, 48)), [cv2.IMWRITE_JPEG_QUALITY, 85])
    with open(root / "sample_submission.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["te_copy.jpg", 0])
    cv2.imwrite(str(root / "train" / "tr_0999.png"), cv2.imread(str(root / "train" / "tr_0007.png")))
    with open(root / "train.csv", newline="") as fh:
        label7 = next(r["target"] for r in csv.DictReader(fh) if r["ID"] == "tr_0007.png")
    with open(root / "train.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["tr_0999.png", (int(label7) + 1) % 10])  # the same image, another label
    out = tmp_path / "eda"
    assert eda.main(["--data", str(root), "--out_dir", str(out), "--wandb_mode", "offline"]) == 0
    last = capsys.readouterr().out.splitlines()[-2:]  # where the results are and what comes next, after W&B's footer
    assert last == [f"results in {out}/: image_sizes.csv, duplicates.csv, and the W&B run's tables",
                    f"next: python train.py --data {root}"]

    pairs = {(r["id_a"], r["id_b"]): r for r in read_csv(out / "duplicates.csv")}
    copy = pairs[("tr_0005.png", "te_copy.jpg")]
    assert copy["kind"] == "train-test" and int(copy["distance"]) <= 4
    relabelled = pairs[("tr_0007.png", "tr_0999.png")]
    assert relabelled["distance"] == "0" and relabelled["label_conflict"] == "True"
    summary = summary_of(out)
    assert summary["eda/duplicates_train_test"] >= 1 and summary["eda/duplicate_label_conflicts"] >= 1
    assert summary["eda/train_images"] == 61 and summary["eda/test_images"] == 11
    for key in ("eda/class_distribution", "eda/image_sizes", "eda/samples", "eda/duplicates", "eda/train_vs_test"):
        assert f"{key}.artifact_path" in summary, key


@pytest.mark.slow
def test_digits_test_set_is_noisier_than_train(tmp_path):
    out = tmp_path / "eda"
    assert eda.main(["--data", "digits", "--out_dir", str(out), "--wandb_mode", "offline", "--table_rows", "20"]) == 0
    summary = summary_of(out)
    assert summary["eda/gap/noise"] > 3  # the demo's test noise, in training standard deviations
    assert summary["eda/classes"] == 10 and summary["eda/test_images"] == 360


def test_run_diff_on_a_constructed_pair(tmp_path):
    data = load_data("digits")
    truth = data.test_labels
    wrong_a, wrong_b = {3, 10, 11, 50}, {10, 11, 70, 71, 72}  # 10 and 11: both wrong, not listed

    def submission(path, wrong):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["ID", "target"])
            w.writerows([i, (y + 1) % 10 if k in wrong else y] for k, (i, y) in enumerate(zip(data.test_ids, truth)))
        return str(path)

    a, b = submission(tmp_path / "a.csv", wrong_a), submission(tmp_path / "b.csv", wrong_b)
    out = tmp_path / "diff"
    assert eda.main(["--diff", a, b, "--data", "digits", "--out_dir", str(out), "--wandb_mode", "offline"]) == 0
    rows = read_csv(out / "diff.csv")
    listed = {r["id"]: r["who is right"] for r in rows}
    expected = ({data.test_ids[k]: "B right" for k in wrong_a - wrong_b}
                | {data.test_ids[k]: "A right" for k in wrong_b - wrong_a})
    assert listed == expected
    summary = summary_of(out)
    assert summary["diff/A_right_B_wrong"] == 3 and summary["diff/B_right_A_wrong"] == 2
    assert summary["diff/images.artifact_path"]


def test_diff_of_a_submission_with_missing_rows_is_one_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,target\ndigit-0001,3\n")
    code = eda.main(["--diff", str(bad), str(bad), "--data", "digits", "--out_dir", str(tmp_path / "d"),
                     "--wandb_mode", "disabled"])
    assert code == 1 and "test id(s) missing" in capsys.readouterr().err
