"""A stop at any moment is one clean stop that --resume continues from: sent to the process or to its whole process
group (loader workers included), during the decode of the images, mid-epoch, during validation and during the test
set's prediction. Each stop here is a real signal, sent by the run to itself at a chosen point (a patched function),
so the phase is certain; the resumed run must end bit-identical to one never stopped. A stop the run sends itself
is run in this process (conftest.run_train: the imports are paid once); the tests whose subject is the process (a
stop sent to its whole group, a crash's exit, the W&B service ended too) start a real one."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import datasets.cache
from conftest import (
    ROOT,
    TINY_MODEL,
    UNSET,
    as_main,
    attempts_history,
    isolated_env,
    make_competition_folder,
    read_run,
    run_train,
    stop_at,
    wait_for_epochs,
)

ARGS = ["--final_fit", "false", "--model", TINY_MODEL,
        "--img_size", "32", "--epochs", "3", "--batch_size", "16", "--drop_rate", "0.2",
        "--mixup", "0.2", "--table_rows", "4"]
STEPS_PER_EPOCH = 12  # 240 images, 48 of them validate: 192 / 16


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data, and one run of it never stopped."""
    tmp = tmp_path_factory.mktemp("stop-phases")
    data = make_competition_folder(tmp / "comp")
    out_dir = tmp / "reference"
    with pytest.MonkeyPatch.context() as env:  # this module's environment (the per-test one is not set up yet)
        for key in UNSET:
            env.delenv(key, raising=False)
        for key, value in isolated_env(tmp).items():
            env.setenv(key, value)
        run_train(["--data", str(data), *ARGS, "--workers", "0", "--out_dir", str(out_dir), "--wandb_mode",
                   "disabled"])
    return data, out_dir


def self_stop(at: str, n: int, sig: str = "SIGTERM") -> str:
    """stop_at as Python code for a process of its own (benchmarks/stop_phases.py): patches `at` to send the process
    `sig` on its n-th call, and prints the number of calls at exit."""
    module, name = at.split(":")
    *owner, name = name.split(".")
    return (f"import atexit, functools, importlib, os, signal\nowner = importlib.import_module({module!r})\n"
            f"for part in {owner!r}: owner = getattr(owner, part)\nf, calls = getattr(owner, {name!r}), [0]\n"
            f"@functools.wraps(f)\ndef g(*a, **k):\n    calls[0] += 1\n"
            f"    if calls[0] == {n}: os.kill(os.getpid(), signal.{sig})\n    return f(*a, **k)\n"
            f"setattr(owner, {name!r}, g)\natexit.register(lambda: print(f'calls: {{calls[0]}}'))\n")


def train(data: Path, out_dir: Path, *args, patch: str = "", group: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", as_main(patch), "--data", str(data), *ARGS, "--out_dir",
                             str(out_dir), *args], cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, process_group=0 if group else None)


def stopped(proc: subprocess.Popen | subprocess.CompletedProcess, code: int = 128 + signal.SIGTERM) -> tuple[str, str]:
    """The stdout and stderr of a run that ended in one clean stop (a process, or run_train's result)."""
    out, err = proc.communicate(timeout=300) if isinstance(proc, subprocess.Popen) else (proc.stdout, proc.stderr)
    assert proc.returncode == code, f"{proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    return out, err


def train_here(data: Path, out_dir: Path, *args) -> subprocess.CompletedProcess:
    """train() in this process (conftest.run_train), for a stop the run sends itself (stop_at)."""
    return run_train(["--data", str(data), *ARGS, "--out_dir", str(out_dir), *args], check=False)


def rows(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("train/epoch_seconds", "_time")} for line in lines]


def assert_same_run(out_dir: Path, reference: Path) -> None:
    a, b = load_file(reference / "last.safetensors"), load_file(out_dir / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ from the unstopped run"
    assert rows(out_dir) == rows(reference)  # every epoch once, the same numbers
    assert (out_dir / "submission.csv").read_text() == (reference / "submission.csv").read_text()
    assert not (out_dir / "resume.pt").exists()
    assert json.loads((out_dir / "summary.json").read_text())["_exit_code"] == 0


def resume(data: Path, out_dir: Path, workers: int = 0) -> str:
    """The stopped run continued to its end (in this process: the stop is what needed a process of its own)."""
    return run_train(["--data", str(data), *ARGS, "--out_dir", str(out_dir), "--workers", str(workers)]).stdout


@pytest.mark.slow
def test_a_stop_mid_epoch_resumes_inside_the_epoch_bit_identical(tmp_path, reference):
    data, ref = reference
    out_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:  # after the 3rd optimizer step of epoch 2
        stop_at(patch, "optim.stepper:Stepper.step", STEPS_PER_EPOCH + 3)
        out, err = stopped(train_here(data, out_dir, "--workers", "2"))  # loader workers forked from this process
    assert "during training in epoch 2" in err
    assert json.loads((out_dir / "summary.json").read_text())["stopped"] == "SIGTERM during training in epoch 2"
    assert [r["epoch"] for r in rows(out_dir)] == [1]
    out = resume(data, out_dir, workers=0)  # other loader workers: the same batches
    assert "resumed at epoch 2 of 3, after its first 3 batches" in out
    assert_same_run(out_dir, ref)
    parts = attempts_history(out_dir)  # the W&B step continues where the stop left it
    assert len(parts) == 2
    rows_ = [h for part in parts for h in part]
    assert [h["epoch"] for h in rows_ if "epoch" in h] == [1, 2, 3]
    step_rows = [h for h in rows_ if "global_step" in h]  # --log_every 20 of 36 steps, the row after the resume
    assert [h["global_step"] for h in step_rows] == [20] and step_rows[0] in parts[1]
    assert step_rows[0]["train/loss_step"] > 0 and step_rows[0]["train/lr_step"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("at, n, phase, epochs_logged, resumed", [
    # the 2nd optimizer step of epoch 1: a stop there leaves a state to resume from too
    ("optim.stepper:Stepper.step", 2, "training in epoch 1", [], "resumed at epoch 1 of 3, after its first 2 batches"),
    # validation has 3 batches an epoch: the 2nd batch of epoch 2's validation
    ("workflows.inference:to_input", 3 + 2, "validation in epoch 2", [1],
     "resumed at epoch 2 of 3, after its first 12 batches"),
    # 3 epochs of 3 validation batches, then the 40 test images' 3 batches: the 2nd of them
    ("workflows.inference:to_input", 9 + 2, "test prediction", [1, 2, 3], "resumed after the last epoch"),
], ids=["epoch-1", "validation", "test-prediction"])
def test_a_stop_in_any_phase_is_honoured_there_and_resumes(tmp_path, reference, at, n, phase, epochs_logged,
                                                          resumed):
    data, ref = reference
    out_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        stop_at(patch, at, n)
        out, err = stopped(train_here(data, out_dir, "--workers", "0", "--wandb_mode", "disabled"))
    assert f"during {phase}" in err and (out_dir / "resume.pt").is_file()
    assert [r["epoch"] for r in rows(out_dir)] == epochs_logged  # no epoch logged half-done
    assert not (out_dir / "submission.csv").exists()
    assert resumed in resume(data, out_dir)
    assert_same_run(out_dir, ref)


@pytest.mark.slow
def test_a_stop_during_the_image_decode_ends_it_early_and_keeps_no_half_cache(tmp_path, reference):
    data, ref = reference
    out_dir, cache = tmp_path / "run", tmp_path / "cache"  # its own: the session's is shared
    load = datasets.cache.load_image

    def slow(p):  # 240 images: about 6 s of decoding on 2 threads
        time.sleep(0.05)
        return load(p)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.cache, "load_image", slow)
        calls = stop_at(patch, "datasets.cache:load_image", 20)
        out, err = stopped(train_here(data, out_dir, "--workers", "0", "--wandb_mode", "disabled", "--cache", "disk",
                                      "--cache_dir", str(cache)))
    assert "during decoding images" in err
    assert not list(cache.glob("*.npy")) and not list(cache.glob(".*tmp*"))  # nothing half-decoded is kept
    assert calls[0] < 100  # of 240: the rest were never decoded
    resume(data, out_dir)  # nothing trained yet: the same command starts it again, in place
    assert_same_run(out_dir, ref)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_sent_to_the_whole_process_group_is_one_clean_stop(tmp_path, reference, sig):
    """What a terminal's Ctrl-C, SLURM and `kill -- -PGID` do: the loader workers get the signal too. The run (in W&B's
    offline mode) saves, records the stop in W&B and its summary, exits 128 + signal within seconds, and resumes."""
    data, ref = reference
    out_dir = tmp_path / "run"
    proc = train(data, out_dir, "--workers", "2", group=True)
    wait_for_epochs(proc, out_dir, 1)
    os.killpg(proc.pid, sig)
    sent = time.time()
    _, err = stopped(proc, 128 + sig)
    assert time.time() - sent < 20 and f"stopped by {signal.Signals(sig).name}" in err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["_exit_code"] == 128 + sig
    assert re.match(rf"{signal.Signals(sig).name} during (training|validation) in epoch [23]", summary["stopped"])
    assert all((out_dir / f).is_file() for f in ("last.safetensors", "best.safetensors", "resume.pt"))
    exit_record = next(r for r in read_run(next(out_dir.glob("wandb/offline-run-*"))) if r["type"] == "exit")
    assert exit_record["exit"]["exit_code"] == 128 + sig
    resume(data, out_dir, workers=2)
    assert_same_run(out_dir, ref)


@pytest.mark.slow
def test_a_stopped_run_continues_into_another_folder(tmp_path, reference):
    """--resume A --out_dir B: B gets A's epochs so far and continues them; A is left as it was."""
    data, ref = reference
    first, second = tmp_path / "first", tmp_path / "second"
    with pytest.MonkeyPatch.context() as patch:
        stop_at(patch, "optim.stepper:Stepper.step", STEPS_PER_EPOCH + 3)
        stopped(train_here(data, first, "--workers", "0", "--wandb_mode", "disabled"))
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    run_train(["--data", str(data), *ARGS, "--workers", "0", "--wandb_mode", "disabled", "--resume", str(first),
               "--out_dir", str(second)])
    assert_same_run(second, ref)
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_a_crash_with_loader_workers_still_exits(tmp_path, reference):
    """Workers ignore SIGTERM (a group's stop is the main process's); multiprocessing's exit hook ends them with
    SIGTERM and then waits for them: a crash that left their loader alive must not wait forever."""
    data, _ = reference
    boom = ("import optim.stepper as st\nstep = st.Stepper.step\ndef g(self, b):\n    if self.steps == 14: "
            "raise RuntimeError('boom')\n    return step(self, b)\nst.Stepper.step = g\n")
    proc = train(data, tmp_path / "run", "--workers", "2", "--wandb_mode", "disabled", patch=boom)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "RuntimeError: boom" in err


@pytest.mark.slow
def test_a_stop_that_also_ends_the_wandb_service_exits_cleanly(tmp_path, reference):
    """SLURM signals every process of a job, W&B's service process (wandb-core, in a session of its own) too:
    the run cannot finish its W&B run, and says so in one line instead of a traceback."""
    data, _ = reference
    out_dir = tmp_path / "run"
    proc = train(data, out_dir, "--workers", "2")
    wait_for_epochs(proc, out_dir, 1)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    core = [int(c) for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "wandb-core"]
    assert core
    for pid in [*core, proc.pid]:
        os.kill(pid, signal.SIGTERM)
    out, err = stopped(proc)
    assert "W&B's service process ended before the run could finish" in err and "wandb sync" in err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["_exit_code"] == 143 and summary["wandb_unfinished"] is True
    assert (out_dir / "resume.pt").is_file()
