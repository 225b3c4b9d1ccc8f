"""Offline sweeps end to end: real train.py trials in real offline W&B runs, a runner killed and restarted, the
journal of that sweep, a crash, hyperband's stop (with a scripted stand-in program), cross-validated trials. A
stop signal sent to train.py from outside: tests/test_stop_phases.py."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import train
from conftest import ROOT, TINY_MODEL, make_competition_folder, read_run, run_script

pytestmark = pytest.mark.slow


def write_sweep(path: Path, **sweep) -> Path:
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_cmd(*args) -> list[str]:
    return [sys.executable, "sweep.py", *map(str, args)]


def trials(sweep_dir: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (sweep_dir / "trials").glob("*.json")), key=lambda t: t["number"])


def run_record(run_dir: Path) -> dict:
    return next(r["run"] for r in read_run(run_dir) if r["type"] == "run")


LRS = [0.002, 0.01, 0.0005, 0.005]  # a grid; 0.002 is train.py's default lr: the journal's baseline trial


def test_offline_sweep_of_train_py_survives_a_killed_runner(tmp_path):
    """The runner killed mid-sweep and started again: kept trials, rerun ones, the leaderboard, the W&B runs; then
    the journal of the sweep (one sweep serves both: each costs a few trial processes)."""
    data = make_competition_folder(tmp_path / "comp", n_train=120, n_test=20)
    spec = write_sweep(tmp_path / "digits.yaml", program="train.py", method="grid",
                       metric={"name": "val/f1_macro", "goal": "maximize"}, parameters={
                           "data": {"value": str(data)}, "model": {"value": TINY_MODEL}, "img_size": {"value": 32},
                           "epochs": {"value": 2}, "workers": {"value": 0}, "table_rows": {"value": 8},
                           "final_fit": {"value": "false"}, "lr": {"values": LRS}})
    sweep_dir = tmp_path / "sw"
    cmd = sweep_cmd(spec, "--count", 4, "--workers", 2, "--sweep_dir", sweep_dir)
    runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:  # a trial done and the next launched, seconds away from its first step
        now = trials(sweep_dir)
        if len(now) >= 3 and any(t["state"] == "finished" for t in now):
            break
        assert time.time() < deadline and runner.poll() is None
        time.sleep(0.1)
    runner.kill()  # SIGKILL: no chance to clean up; the kernel SIGTERMs its trials
    runner.wait()
    before = {t["id"]: t for t in trials(sweep_dir)}
    finished_before = {i for i, t in before.items() if t["state"] == "finished"}
    assert finished_before and len(before) in (3, 4)

    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = trials(sweep_dir)
    assert len(after) == 4 and len({t["id"] for t in after}) == 4
    unfinished = [t for t in after if t["state"] != "finished"]
    assert not unfinished, [(t, (sweep_dir / "trials" / f"{t['id']}.log").read_text()[-3000:]) for t in unfinished]
    assert len({json.dumps(t["params"], sort_keys=True) for t in after}) == 4  # no trial ran twice as a new one
    for t in after:
        if t["id"] in finished_before:  # kept, not rerun
            assert (t["attempts"], t["started"]) == (1, before[t["id"]]["started"])
    starting = [t for t in after if t["number"] >= 3 and t["id"] in before]
    assert starting and all(t["attempts"] == 2 for t in starting)  # killed while starting up: run again, same id
    for aside in (sweep_dir / "interrupted").glob("*"):  # what an interrupted attempt had written is kept
        assert next(t for t in after if aside.name == f"{t['id']}-attempt1")["attempts"] == 2

    header = next(csv.reader(open(sweep_dir / "leaderboard.csv")))
    assert header[0] == "rank" and header.count("rank") == 1
    rows = list(csv.DictReader(open(sweep_dir / "leaderboard.csv")))
    assert [r["run_id"] for r in rows] == [t["id"] for t in sorted(after, key=lambda t: -json.loads(
        (sweep_dir / "runs" / t["id"] / "summary.json").read_text())["val/f1_macro"])]
    assert all(Path(r["checkpoint"]).is_file() for r in rows)
    assert "rank" in out.stdout and all(t["id"] in out.stdout for t in after) and "wandb sweep" in out.stdout

    sweep_id = json.loads((sweep_dir / "sweep.json").read_text())["id"]
    run_dirs = sorted(sweep_dir.glob("runs/*/wandb/offline-run-*"))  # a resumed trial adds a second part of its run
    assert len({d.name.rsplit("-", 1)[1] for d in run_dirs}) == 4  # attempts killed before an epoch ended: kept aside
    for run_dir in run_dirs:
        record = run_record(run_dir)
        trial = next(t for t in after if t["id"] == record["run_id"])
        assert record["run_group"] == f"sweep-{sweep_id}" and f"sweep-{sweep_id}" in record["tags"]
        config = {k: v for k, v in record["config"]["update"].items()}
        assert config["lr"] == pytest.approx(trial["params"]["lr"]) and config["model"] == trial["params"]["model"]

    status = run_script("sweep", ["--status", sweep_dir])
    assert status.returncode == 0 and "4 trials, 4 finished" in status.stdout
    check_journal(sweep_dir)


def check_journal(sweep_dir: Path) -> None:
    """journal.py --sweep on a finished grid over LRS: a row per trial, each scored against the default lr's."""
    proc = run_script("journal", ["--sweep", sweep_dir])
    assert proc.returncode == 0, proc.stderr
    assert f"Every run changes: `final_fit=false img_size=32 model={TINY_MODEL} epochs=2`." in proc.stdout
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| #")]
    trials = {t["id"]: t for t in map(json.loads, map(Path.read_text, (sweep_dir / "trials").glob("*.json")))}
    assert sorted(r[2] for r in rows) == sorted(trials) and all(r[3] == "finished" for r in rows)
    score = {i: json.loads((sweep_dir / "runs" / i / "summary.json").read_text())["val/f1_macro"] for i in trials}
    by_lr = {trials[r[2]]["params"]["lr"]: r for r in rows}
    base = by_lr[0.002][2]  # the default lr: the changes every run shares, and nothing else
    assert by_lr[0.002][4] == "—" and by_lr[0.002][6] == ""
    for lr in LRS[1:]:
        row = by_lr[lr]
        assert row[4] == f"lr={lr:g}" and row[5].strip("*") == f"{score[row[2]]:.4f}"
        assert row[6] == f"{score[row[2]] - score[base]:+.4f} vs {base} (baseline)"
        assert row[10] == str(sweep_dir / "runs" / row[2] / "best.safetensors")
    best = max(score, key=score.get)
    assert next(r for r in rows if r[2] == best)[5] == f"**{score[best]:.4f}**"
    assert (sweep_dir / "journal.md").read_text() == proc.stdout


def test_crash_is_recorded_and_hyperband_stops_the_poor_trial(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the runner sets it only where the user did not
    spec = write_sweep(tmp_path / "fake.yaml", program="tests/fake_trial.py", method="grid",
                       metric={"name": "val/f1_macro", "goal": "maximize"},
                       parameters={"seed": {"values": [1, 2, 13, 10]}, "epochs": {"value": 12}},
                       early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2})
    out = run_script("sweep", [spec, "--workers", 1, "--gpus", "7", "--sweep_dir", tmp_path / "sw"])
    assert out.returncode == 0, out.stdout + out.stderr
    by_seed = {t["params"]["seed"]: t for t in trials(tmp_path / "sw")}
    assert [by_seed[s]["state"] for s in (1, 2, 13, 10)] == ["finished", "finished", "failed", "stopped"]
    assert by_seed[13]["exit_code"] == 1 and "scripted crash" in out.stdout
    assert by_seed[10]["exit_code"] == 128 + signal.SIGTERM
    history = (tmp_path / "sw" / "runs" / by_seed[10]["id"] / "metrics.jsonl").read_text().splitlines()
    assert 2 <= len(history) < 12  # stopped after the first band, well before its 12 epochs
    env = json.loads((tmp_path / "sw" / "runs" / by_seed[1]["id"] / "summary.json").read_text())["env"]
    # 1 worker: all cores
    assert env == {"CUDA_VISIBLE_DEVICES": "7", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}


def test_failures_in_a_row_stop_the_sweep(tmp_path):
    spec = write_sweep(tmp_path / "crash.yaml", program="tests/fake_trial.py", method="grid",
                       metric={"name": "val/f1_macro", "goal": "maximize"},
                       parameters={"seed": {"values": [3, 13, 23, 33]}, "epochs": {"value": 2}})
    out = run_script("sweep", [spec, "--max_failures", 2, "--sweep_dir", tmp_path / "sw"])
    assert out.returncode == 1 and "2 trials failed in a row" in out.stdout
    assert [t["state"] for t in trials(tmp_path / "sw")] == ["failed", "failed"]


def test_cross_validated_trial_reports_the_mean_and_every_oof_probability(tmp_path, competition):
    out_dir = tmp_path / "cv"
    assert train.main(["--data", str(competition), "--model", TINY_MODEL, "--img_size", "32", "--epochs", "1",
                       "--workers", "0", "--folds", "3", "--cv", "True", "--table_rows", "4",
                       "--out_dir", str(out_dir)]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    folds = [summary[f"fold{k}/val/f1_macro"] for k in range(3)]
    assert summary["val/f1_macro"] == pytest.approx(np.mean(folds))
    assert summary["val/f1_macro_std"] == pytest.approx(np.std(folds))
    rows = list(csv.DictReader(open(out_dir / "oof.csv")))
    train_ids = [line.split(",")[0] for line in (competition / "train.csv").read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in rows) == sorted(train_ids)  # every training image exactly once
    assert sorted({r["fold"] for r in rows}) == ["0", "1", "2"]
    probs = np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in rows])
    competition_classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    for k in range(3):
        assert ((out_dir / f"fold{k}" / "best.safetensors").is_file()
                and (out_dir / f"fold{k}" / "report.html").is_file())
    page = (out_dir / "report.html").read_text()  # the run's own page: the out-of-fold mistakes
    wrong = int(np.sum(probs.argmax(1) != np.array([competition_classes.index(r["label"]) for r in rows])))
    assert f"{wrong} misclassified" in page and page.count('class="card"') == min(wrong, 4)
    records = read_run(next(out_dir.glob("wandb/offline-run-*")))
    artifacts = {r["artifact"]["type"] for r in records if r["type"] == "artifact"}
    assert {"oof", "model", "submission"} <= artifacts
