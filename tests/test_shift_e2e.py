"""A competition whose test set is turned and noisy, end to end in W&B's real offline mode: train.py measures the
test set (test_shift in the config), validates on noisy copies (val/*) beside the clean ones (val_clean/*), and
trains again on the confident test images that predict.py --save_probs wrote (pseudo-labels)."""
import csv

import albumentations as A
import cv2
import pytest
from test_train_e2e import merged

import predict
from conftest import TINY_MODEL, make_competition_folder, read_run, run_train

pytestmark = pytest.mark.slow


@pytest.fixture
def noisy_competition(tmp_path):
    root = make_competition_folder(tmp_path / "noisy", n_train=200, n_test=160)
    noise = A.Compose([A.RandomRotate90(p=1.0), A.GaussNoise(std_range=(0.1, 0.2), p=1.0)], seed=5)
    for path in (root / "test").iterdir():
        cv2.imwrite(str(path), noise(image=cv2.imread(str(path)))["image"])
    return root


def test_noisy_test_set_drives_augmentation_validation_and_pseudo_labels(noisy_competition, tmp_path):
    args = ["--data", str(noisy_competition), "--model", TINY_MODEL, "--img_size", "32", "--epochs=2", "--workers=0",
            "--batch_size=32", "--table_rows=5", "--keep_top_k=1"]
    proc = run_train(args + [f"--out_dir={tmp_path / 'a'}"])
    assert "test set vs training set" in proc.stdout and "val_clean/f1_macro" in proc.stdout
    records = read_run(next((tmp_path / "a" / "wandb").glob("offline-run-*")))
    config = merged(records, "config")
    settings = config["test_shift"]["settings"]
    assert settings["turn"]["p"] > 0.5 and settings["noise"]["p"] > 0.5, config["test_shift"]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert {"val/f1_macro", "val_clean/f1_macro", "val_clean/loss"} <= set(history[-1])

    probs = tmp_path / "probs.csv"
    assert predict.main([str(tmp_path / "a"), "--data", str(noisy_competition), "--out", str(tmp_path / "sub.csv"),
                         "--save_probs", str(probs), "--test_bn", "adapt"]) == 0
    rows = list(csv.DictReader(open(probs)))
    run_id = next((tmp_path / "a" / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[1]
    assert len(rows) == 160 and f"(run {run_id}, {TINY_MODEL})" in rows[0]["source"]

    proc = run_train(args + [f"--out_dir={tmp_path / 'b'}", f"--pseudo_labels={probs}", "--pseudo_threshold=0.05"])
    assert "pseudo-labels: 160 of 160 test images" in proc.stdout and "+ 160 pseudo-labelled" in proc.stdout
    config = merged(read_run(next((tmp_path / "b" / "wandb").glob("offline-run-*"))), "config")
    assert (config["pseudo_label_source"]["added"] == 160
            and config["pseudo_label_source"]["source"] == [rows[0]["source"]])

    wrong = tmp_path / "wrong.csv"  # another data set's classes
    wrong.write_text("id,source,p_a,p_b\n" + "".join(f"{r['id']},x,0.5,0.5\n" for r in rows))
    proc = run_train(args + [f"--out_dir={tmp_path / 'c'}", f"--pseudo_labels={wrong}"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "p_zero" in proc.stderr
