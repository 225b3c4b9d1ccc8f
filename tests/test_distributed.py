"""torchrun: 2 CPU processes (gloo) train on the same global batches as one process and log the same
metrics; only rank 0 writes the W&B run, the checkpoints and the submission."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_competition_folder, read_run, run_train
from datasets import build_sampler

N_TRAIN, N_TEST = 400, 100  # digits images: 320 train, 80 validate; the test set makes the final fit's pseudo-labels
LOSS_RTOL = 1e-4      # losses of the 2-process run vs the 1-process run, relative
METRIC_ATOL = 0.025   # accuracy / macro-F1 / acsa, absolute: about 2 of the 80 validation images (~0.0125 each)


@pytest.mark.parametrize("name", ["random", "imbalanced"])
def test_ranks_split_each_global_batch(name):
    labels = np.array([0] * 50 + [1] * 30 + [2] * 21)
    one = list(build_sampler(name, labels, seed=5))
    ranks = [list(build_sampler(name, labels, seed=5, rank=r, world=3)) for r in range(3)]
    assert all(len(r) == len(labels) // 3 for r in ranks)
    batch, per_rank = 24, 8  # global batch 24 = 3 ranks x 8
    for b in range(len(labels) // batch):  # drop_last: the full global batches
        together = sorted(sum((r[b * per_rank:(b + 1) * per_rank] for r in ranks), []))
        assert together == sorted(one[b * batch:(b + 1) * batch])  # same images, same augmentation seeds


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    data = make_competition_folder(tmp_path / "comp", n_train=N_TRAIN, n_test=N_TEST)
    args = ["train.py", "--data", str(data), "--model", "test_convnext", "--img_size", "32", "--epochs", "2",
            "--batch_size", "32", "--accum_steps", "2", "--sampler", "imbalanced", "--workers", "0", "--resume", "",
            "--log_every", "2", "--wandb_mode", "offline", "--device", "cpu"]  # gloo processes, also with one GPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--out_dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: the same sums in the same order
    try:  # one process: this one (the process boundary is torchrun's)
        one = run_train([*args[1:], "--final_fit=auto", "--out_dir", tmp_path / "one"])
    finally:
        torch.set_num_threads(threads)
    assert "2 processes" in two.stdout and two.stdout.count("\nepoch   2/2") == 1  # rank 1 prints nothing
    assert two.stdout.count("final/epoch   2/2") == 1 and "final fit on every labelled image predicted it" in two.stdout
    added = [next(line for line in p.stdout.splitlines() if "pseudo-labels (--final_pseudo 0.3)" in line) for p in
             (one, two)]  # rank 0's pseudo-labels, broadcast: every rank trains on the same rows as one process
    assert added[0] == added[1] and two.stdout.count("pseudo-labelled, val") == 1

    rows = {k: [json.loads(line) for line in open(tmp_path / k / "metrics.jsonl")] for k in ("one", "two")}
    assert len(rows["one"]) == len(rows["two"]) == 4  # the holdout's 2 epochs, then the final fit's
    rows = {k: [r for r in v if "train/loss" in r] for k, v in rows.items()}  # the holdout's
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("train/loss", "val/loss"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), key
        for key in ("val/acc", "val/f1_macro", "val/acsa"):
            assert abs(b[key] - a[key]) <= METRIC_ATOL, key

    run_dirs = list((tmp_path / "two" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1  # one W&B run, rank 0's
    records = read_run(run_dirs[0])
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert sum("epoch" in h for h in history) == 4 and [r["exit"]["exit_code"] for r in records
                                                         if r["type"] == "exit"] == [0]
    steps = [h["global_step"] for h in history if "global_step" in h]
    assert steps and all(s % 2 == 0 for s in steps)  # --log_every: rank 0's rows
    assert not (tmp_path / "two" / "resume.pt").exists()
    assert (tmp_path / "two" / "best.safetensors").is_file() and (tmp_path / "two" / "submission.csv").is_file()
    assert (tmp_path / "two" / "final" / "best.safetensors").is_file()
    one_sub = (tmp_path / "one" / "submission.csv").read_text().splitlines()
    two_sub = (tmp_path / "two" / "submission.csv").read_text().splitlines()
    agree = np.mean([x == y for x, y in zip(one_sub, two_sub)])
    assert agree >= 0.97, agree


def test_batch_size_must_split_over_processes(tmp_path, monkeypatch, capsys):
    """Rank 0 of torchrun --nproc_per_node=2 (the test above runs a real one): its process group, faked here, holds
    2 processes from the moment train.py joins it; the check comes after the join and before any run folder."""
    import torch.distributed as dist

    import train
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2 if joined else 1)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: joined.clear())
    assert train.main(["--batch_size", "33", "--device", "cpu", "--wandb_mode", "disabled",
                       "--out_dir", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == ("error: --batch_size 33 is the global batch and must split evenly over the 2 "
                                       "processes\n")
    assert joined == [] and not (tmp_path / "r").exists()  # the group left; nothing written


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch, capsys):
    """torchrun --nproc_per_node=2 on a 1-GPU machine: one line naming the fix, before any process group (the CUDA
    side is faked here: this machine has no GPU)."""
    import torch

    import train
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert train.main(["--epochs", "1"]) == 1
    assert capsys.readouterr().err == ("error: torchrun started 2 processes on this machine, but 1 GPU(s) are visible: "
                                       "use --nproc_per_node=1 (one process per GPU), or --device cpu\n")
