"""Nothing lost: a run killed (SIGKILL) at any point and resumed ends bit-identical to one never
interrupted, whatever --workers is; resume files are plain data, and a crafted pickle is refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT, TINY_MODEL, attempts_history, run_train, stop_at
from utils.background import BackgroundWriter
from workflows.resume import RESUME_FILE, load_state, save_state

# dropout and mixup draw from the torch and numpy RNGs: a resume that lost either would diverge
ARGS = ["--final_fit", "false", "--model", TINY_MODEL,
        "--img_size", "32", "--epochs", "4", "--batch_size", "16", "--drop_rate", "0.2",
        "--mixup", "0.2", "--table_rows", "4"]


def rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def start(data: Path, out_dir: Path, workers: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", "--data", str(data), *ARGS, "--workers", str(workers),
                             "--out_dir", str(out_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())


def kill_after(proc: subprocess.Popen, out_dir: Path, epochs_done: int, extra: float) -> None:
    """SIGKILL once `epochs_done` epochs are logged and the state after the first is saved, plus `extra` s."""
    deadline = time.time() + 180
    while not (out_dir / "resume.pt").exists() or len(rows(out_dir)) < epochs_done:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(extra)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, competition):
    reference = tmp_path / "reference"
    run_train(["--data", str(competition), *ARGS, "--workers", "0", "--out_dir", str(reference)])

    out_dir = tmp_path / "killed"
    kill_after(start(competition, out_dir, workers=2), out_dir, epochs_done=1, extra=0.0)  # as soon as it saved state
    # a kill in the middle of writing a checkpoint leaves only a temp file beside the whole old ones
    (out_dir / ".resume.pt.tmp-999").write_bytes(b"PK\3\4" + os.urandom(1000))
    (out_dir / ".last.safetensors.tmp-999").write_bytes(b"\0" * 100)
    kill_after(start(competition, out_dir, workers=0), out_dir, epochs_done=2, extra=0.3)  # mid-epoch 3
    run_train(["--data", str(competition), *ARGS, "--workers", "1", "--out_dir", str(out_dir)])

    a, b = load_file(reference / "last.safetensors"), load_file(out_dir / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("train/epoch_seconds", "_time")} for r in rs]
    assert strip(rows(out_dir)) == strip(rows(reference))  # every epoch once, the same numbers
    assert (not (out_dir / "resume.pt").exists()
            and json.loads((out_dir / "summary.json").read_text())["_exit_code"] == 0)
    assert (out_dir / "submission.csv").read_text() == (reference / "submission.csv").read_text()

    parts = sorted(out_dir.glob("wandb/offline-run-*"))  # one W&B run in parts: each attempt syncs into it
    assert len(parts) == 3 and len({p.name.rsplit("-", 1)[1] for p in parts}) == 1
    history = attempts_history(out_dir)  # each row at one step in every attempt: no conflicts when synced
    assert history[-1][0]["_step"] == history[-1][0]["resumed_at_step"] > 0 and history[-1][-1]["epoch"] == 4
    ref = [h for part in attempts_history(reference) for h in part]  # at the steps of an uninterrupted run
    at = lambda rows_: {(h.get("epoch"), h.get("global_step")): h["_step"] for rows in rows_ for h in rows
                        if "epoch" in h or "global_step" in h}
    logged, uninterrupted = at(history), at([ref])  # a killed attempt may not have handed its last row to W&B
    assert logged and all(uninterrupted[k] == v for k, v in logged.items()), (logged, uninterrupted)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/sweepcls-crafted-pickle-ran")


def test_crafted_resume_file_is_refused(tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    bad = tmp_path / "run" / "resume.pt"
    bad.parent.mkdir()
    torch.save({"format": "sweepcls-resume/1", "payload": RunsCode()}, bad)
    assert train.main(["--resume", str(bad), "--wandb_mode", "disabled"]) == 1
    err = capsys.readouterr().err
    assert "refused to load" in err and "could run code" in err and "Traceback" not in err
    assert not MARKER.exists()


STEPS_PER_EPOCH = 12  # 240 images, 48 of them validate: 192 / 16


def stopped_in_epoch_2(data: Path, out_dir: Path) -> None:
    """A run of ARGS stopped (its own SIGTERM, in this process) at the first step of epoch 2: a state to resume."""
    with pytest.MonkeyPatch.context() as patch:
        stop_at(patch, "optim.stepper:Stepper.step", STEPS_PER_EPOCH + 1)
        proc = run_train(["--data", str(data), *ARGS, "--workers", "0", "--out_dir", str(out_dir)], check=False)
    assert proc.returncode == 128 + signal.SIGTERM and (out_dir / "resume.pt").is_file(), proc.stderr[-2000:]


def test_resume_with_another_config_is_refused(tmp_path, competition, capsys):
    out_dir = tmp_path / "run"
    stopped_in_epoch_2(competition, out_dir)
    code = train.main(["--data", str(competition), *ARGS, "--lr", "0.01", "--workers", "0", "--out_dir", str(out_dir),
                       "--wandb_mode", "disabled"])
    err = capsys.readouterr().err
    assert code == 1 and "the run was started with other values (lr: 0.002 -> 0.01)" in err
    assert (out_dir / "resume.pt").is_file()  # nothing touched


class NanFor:
    """Cross entropy, except that its first `n` calls return NaN."""
    soft_targets = False

    def __init__(self, n):
        self.n = n

    def __call__(self, logits, y):
        self.n -= 1
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if self.n >= 0 else loss


def nan_stepper(n_bad, patience):
    from optim import build_scheduler
    from optim.stepper import Stepper
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Stepper(model, NanFor(n_bad), optimizer, build_scheduler("none", optimizer),
                   torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), nan_patience=patience)


def test_nan_steps_are_skipped_then_patience_stops_with_the_weights_untouched():
    from utils import UserError
    batch = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    stepper = nan_stepper(n_bad=2, patience=3)
    before = stepper.model.weight.detach().clone()
    assert stepper.step(batch) is None and stepper.step(batch) is None  # skipped
    assert torch.equal(stepper.model.weight, before) and stepper.steps == 0
    assert torch.isfinite(stepper.step(batch)) and not torch.equal(stepper.model.weight, before)  # training goes on
    assert stepper.bad_steps == 0 and stepper.steps == 1

    stepper = nan_stepper(n_bad=10, patience=3)
    before = stepper.model.weight.detach().clone()
    stepper.step(batch), stepper.step(batch)
    with pytest.raises(UserError, match="NaN/inf for 3 optimizer steps in a row"):
        stepper.step(batch)
    assert torch.equal(stepper.model.weight, before)


def test_diverging_run_fails_cleanly(tmp_path, competition):
    out_dir = tmp_path / "nan"
    proc = run_train(["--data", str(competition), "--model", TINY_MODEL, "--img_size", "32", "--workers", "0",
                      "--optimizer", "sgd", "--lr", "1e25", "--nan_patience", "2", "--out_dir", str(out_dir)],
                     check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "NaN/inf for 2 optimizer steps" in proc.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["_exit_code"] == 1 and "NaN/inf" in summary["error"]
    assert not list(out_dir.glob("*.safetensors"))  # nothing half-trained was saved as a checkpoint


def test_a_full_disk_leaves_earlier_checkpoints_whole(tmp_path):
    from models.checkpoint import CheckpointKeeper, load_checkpoint
    from utils import UserError
    tmp_path = tmp_path / "ck"
    keeper = CheckpointKeeper(tmp_path, keep_top_k=2, maximize=True)
    model = torch.nn.Linear(3, 2)
    meta = {"model": "x", "classes": ["a", "b"]}
    keeper.update(model, meta, 1, 0.5)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.weight += 1
    (tmp_path / f".last.safetensors.tmp-{os.getpid()}").symlink_to("/dev/full")  # every write there: ENOSPC
    with pytest.raises(UserError, match=r"could not write .*last.safetensors .*No space left on device; the files "
                                        r"already there are intact"):
        keeper.update(model, meta, 2, 0.9)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_checkpoint(tmp_path / "best.safetensors")[1] == meta


def test_the_api_key_is_written_nowhere(tmp_path, competition, monkeypatch):
    secret = "sk-test-0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)  # WANDB_MODE=offline (conftest): a key but no upload
    out_dir = tmp_path / "run"
    run_train(["--data", str(competition), *ARGS[:4], "--epochs", "1", "--workers", "0", "--out_dir", str(out_dir)])
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".safetensors" for p in files)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_killed_cross_validated_run_resumes_at_its_fold(tmp_path, competition):
    cv = ["--folds", "3", "--cv", "True"]
    reference = tmp_path / "reference"
    run_train(["--data", str(competition), *ARGS, *cv, "--epochs", "2", "--workers", "0", "--out_dir", str(reference)])
    out_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(competition), *ARGS, *cv, "--epochs", "2",
                             "--workers", "0", "--out_dir", str(out_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    kill_after(proc, out_dir, epochs_done=4, extra=0.0)  # fold 0 done (2 epochs + its cv row), fold 1 under way
    assert (out_dir / "fold0" / "result.npz").is_file() and not (out_dir / "fold2" / "result.npz").exists()
    run_train(["--data", str(competition), *ARGS, *cv, "--epochs", "2", "--workers", "0", "--out_dir", str(out_dir)])
    assert (out_dir / "oof.csv").read_text() == (reference / "oof.csv").read_text()
    for k in range(3):
        a = load_file(reference / f"fold{k}" / "last.safetensors")
        b = load_file(out_dir / f"fold{k}" / "last.safetensors")
        assert all(torch.equal(a[n], b[n]) for n in a)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("epoch_seconds") and k != "_time"} for r in rs]
    assert strip(rows(out_dir)) == strip(rows(reference))


def test_background_save_state_keeps_the_values_at_the_call(tmp_path):
    weights = {"w": torch.zeros(3), "nested": [{"m": torch.ones(2)}], "step": 4}
    worker = BackgroundWriter("t")
    worker.submit(lambda: time.sleep(0.3))  # busy: the write happens after the training below
    save_state(tmp_path / RESUME_FILE, weights, worker)
    weights["w"].add_(5)
    weights["nested"][0]["m"].mul_(3)
    worker.close()
    state = load_state(tmp_path / RESUME_FILE)
    assert torch.equal(state["w"], torch.zeros(3)) and torch.equal(state["nested"][0]["m"], torch.ones(2))
    assert state["step"] == 4


def test_a_run_saved_before_test_time_auto_resumes_under_it(tmp_path):
    from utils import UserError
    from workflows.resume import check_same_run
    saved = {"lr": 0.002, "tta": "none", "test_bn": "none"}
    check_same_run(saved, {"lr": 0.002, "tta": "auto", "test_bn": "auto"}, tmp_path)  # validates alike: no error
    with pytest.raises(UserError, match="tta: 'none' -> 'd4'"):  # views change what every epoch validated
        check_same_run(saved, {"lr": 0.002, "tta": "d4", "test_bn": "auto"}, tmp_path)
