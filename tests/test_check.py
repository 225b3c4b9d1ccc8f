"""train.py --check: the resolved plan, every early check, and nothing written."""
import json

from conftest import TINY_MODEL, make_competition_folder, run_script


def test_check_prints_the_plan_and_writes_nothing(tmp_path):
    data = make_competition_folder(tmp_path / "comp", n_train=60, n_test=10)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_script("train", ["--check", "--data", data, "--model", TINY_MODEL, "--epochs", "3",
                                "--batch-size", "8", "--run_name", "try"], cwd=work)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "changed from the defaults: model=" in out and "epochs=3" in out and "batch_size=8" in out
    assert "60 labelled images" in out and "48 train, 12 validation" in out  # the holdout the run would take
    assert "about 6 optimizer steps per epoch, 18 in 3 epochs" in out and "test set: 10 images" in out
    assert f"model {TINY_MODEL}, " in out and "output: runs/try-<new id>/" in out
    assert list(work.iterdir()) == []  # no run folder, no wandb/ folder


def test_check_says_what_the_run_would_find_and_what_would_stop_it(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"_exit_code": 0, "val/f1_macro": 0.5}))
    proc = run_script("train", ["--check", "--model", TINY_MODEL, "--out_dir", done], cwd=tmp_path)
    assert proc.returncode == 0 and f"output: {done}/ holds a run that finished at" in proc.stdout, proc.stdout
    assert "--restart moves it aside" in proc.stdout
    proc = run_script("train", ["--check", "--model", "resnet181"], cwd=tmp_path)
    assert proc.returncode == 1 and "unknown model 'resnet181'" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "wandb-home"]  # wandb-home: the test's own
