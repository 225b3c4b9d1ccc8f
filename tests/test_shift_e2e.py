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


def test_noisy_test_set_drives_augmentation_validation_and_pseudo_labels(noisy_competition, tmp_path, capsys):
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
    last = capsys.readouterr().out.splitlines()[-1]  # what comes next
    assert last.startswith(f"next: submit {tmp_path / 'sub.csv'}; python ensemble.py")
    rows = list(csv.DictReader(open(probs)))
    own = list(csv.DictReader(open(tmp_path / "a" / "test_probs.csv")))  # the run's own, for a pseudo-label round
    assert own[0]["source"].startswith("a (run ") and [r["id"] for r in own] == [r["id"] for r in rows]
    assert all(abs(float(a[k]) - float(b[k])) < 1e-4 for a, b in zip(own, rows) for k in a if k.startswith("p_"))
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


def test_final_fit_trains_on_every_image_with_the_holdouts_decisions_and_resumes_inside_it(
        noisy_competition, tmp_path, monkeypatch):
    """--final_pseudo 0.3: the final fit also trains on the holdout model's most confident test predictions."""
    import signal

    import numpy as np

    import train
    from datasets.pseudo import select_confident
    from models.checkpoint import read_meta
    from utils.stop import Stopped
    args = ["--data", str(noisy_competition), "--model", TINY_MODEL, "--img_size", "32", "--epochs=2", "--workers=0",
            "--batch_size=32", "--table_rows=5", "--keep_top_k=1", "--final_fit=True", "--final_pseudo=0.3",
            f"--out_dir={tmp_path / 'f'}"]
    real_epoch = train.train_epoch

    def stop_in_final_epoch_2(cfg, run, s, epoch, prefix, stop, progress):
        if prefix == "final/" and epoch == 2:
            raise Stopped(signal.SIGTERM, phase="training")
        return real_epoch(cfg, run, s, epoch, prefix, stop, progress)
    monkeypatch.setattr(train, "train_epoch", stop_in_final_epoch_2)
    proc = run_train(args, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train 160, val 40, test 160" in proc.stdout  # the holdout
    holdout_probs = np.load(tmp_path / "f" / "result.npz")["test_probs"]
    chosen = int(select_confident(holdout_probs, 0.9, 0.3).sum())  # the top 30 % of each predicted class at least
    assert chosen >= 0.3 * 160 and f"pseudo-labels (--final_pseudo 0.3): {chosen} of 160 test images" in proc.stdout
    assert (f"train 200 + {chosen} pseudo-labelled, val 40 (final fit: every labelled image trains, validation "
            "included)") in proc.stdout
    monkeypatch.setattr(train, "train_epoch", real_epoch)

    proc = run_train(args)  # continues inside the final fit: the holdout is not trained again
    assert "resumed at epoch 2 of 2" in proc.stdout and "\nepoch   1/2" not in proc.stdout, proc.stdout
    assert "final fit on every labelled image predicted it" in proc.stdout
    holdout, final = read_meta(tmp_path / "f" / "best.safetensors"), read_meta(tmp_path / "f" / "final" /
                                                                                "best.safetensors")
    assert final["test_time"] == holdout["test_time"] and final["epoch"] == 2  # its last epoch, the holdout's steps
    assert f"+ {chosen} pseudo-labelled" in proc.stdout  # the same rows again, from the holdout's saved predictions
    assert final["lineage"]["pseudo_labels"]["added"] == chosen and "pseudo_labels" not in holdout["lineage"]
    summary = merged(read_run(sorted((tmp_path / "f" / "wandb").glob("offline-run-*"))[-1]), "summary")  # resumed
    assert summary["final/best_epoch"] == 2 and summary["best_epoch"] == holdout["epoch"]
    assert summary["val/f1_macro"] == holdout["metrics"]["val/f1_macro"]  # the monitor stays the holdout's
    assert summary["final/pseudo_labels/added"] == chosen
    assert (tmp_path / "f" / "submission.csv").is_file() and not (tmp_path / "f" / "resume.pt").exists()
    # predict.py on the run dir predicts the test set with its final fit, as the run's own submission did
    # (at predict.py's own batch size of 64: BatchNorm is adapted in the batches the run trained with, 32)
    assert predict.main([str(tmp_path / "f"), "--data", str(noisy_competition), "--out", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text() == (tmp_path / "f" / "submission.csv").read_text()
