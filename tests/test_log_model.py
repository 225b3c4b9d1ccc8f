"""--log_model: the best checkpoint reaches W&B however the run ends, each new best is a version when online
(throttled), nothing with off, and no uploaded copy is kept in ~/.cache/wandb (skip_cache)."""
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import TINY_MODEL, read_run
from models.checkpoint import CheckpointKeeper
from utils import tracking
from workflows import training

ARGS = ["--final_fit", "false", "--model", TINY_MODEL,
        "--img_size", "32", "--epochs", "3", "--batch_size", "16", "--workers", "0",
        "--wandb_mode", "offline", "--resume", ""]


def model_artifacts(out_dir):
    records = [r for d in sorted(out_dir.glob("wandb/offline-run-*")) for r in read_run(d)]
    return [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "model"]


def epochs_of(artifact) -> list[int]:
    return [int(a.split("-")[1]) for a in artifact["aliases"] if a.startswith("epoch-")]


def test_a_crashed_run_still_logs_its_best_model(tmp_path, competition, monkeypatch):
    real = train.log_epoch

    def crash_in_epoch_2(cfg, run, data, s, prefix, metrics, *rest):
        if metrics["epoch"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(cfg, run, data, s, prefix, metrics, *rest)
    monkeypatch.setattr(train, "log_epoch", crash_in_epoch_2)
    out_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train.main(["--data", str(competition), *ARGS, "--out_dir", str(out_dir)])
    (artifact,) = model_artifacts(out_dir)  # the newest best, logged before the run finished with exit code 1
    assert {"best", "latest"} <= set(artifact["aliases"]) and epochs_of(artifact) in ([1], [2])
    assert all(entry["skip_cache"] for entry in artifact["manifest"]["contents"])


def test_log_model_off_logs_no_model(tmp_path, competition):
    out_dir = tmp_path / "run"
    assert train.main(["--data", str(competition), *ARGS, "--epochs", "1", "--log_model", "off",
                       "--out_dir", str(out_dir)]) == 0
    assert model_artifacts(out_dir) == [] and (out_dir / "best.safetensors").is_file()


def test_online_best_logs_each_new_best_throttled_and_the_newest_at_exit(tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, "bestlog1", out_dir, "offline")
    keeper = CheckpointKeeper(out_dir, keep_top_k=1, maximize=True)
    s = SimpleNamespace(keeper=keeper, artifact_name="model-bestlog1")
    log = training.ModelLog("best", online=True)
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(training, "BEST_UPLOAD_SECONDS", 3600.0)
    for epoch, score in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.8)]:
        with torch.no_grad():
            model.weight.fill_(epoch)  # every epoch's weights differ, so every version is a new file
        keeper.update(model, {"epoch": epoch}, epoch, score)
        log.after_epoch(run, s, epoch)
    assert log.logged_epoch == 1  # epochs 2 and 4 came within the hour after the first upload
    log.log_pending(run, s)  # the exit: the newest best, whatever the throttle says
    log.log_pending(run, s)  # logged already: no second copy
    run.finish()
    assert [epochs_of(a) for a in model_artifacts(out_dir)] == [[1], [4]]


@pytest.mark.parametrize("state, again", [("COMMITTED", False), ("PENDING", True), (None, True)])
def test_a_resumed_run_logs_again_a_best_whose_upload_did_not_finish(tmp_path, monkeypatch, state, again):
    """The last attempt handed epoch 2's best to W&B and saved that in resume.pt; a deadline's exit or a SIGKILL
    may have ended the upload. The server's answer (faked at the public API: artifact(ref).state; None: no such
    version) decides whether the resumed run logs it again."""
    asked = []

    class Server:
        def artifact(self, ref):
            asked.append(ref)
            if state is None:
                raise ValueError(f"artifact {ref} not found")
            return SimpleNamespace(state=state)
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: Server())
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, "again2", out_dir, "offline")
    keeper = CheckpointKeeper(out_dir, keep_top_k=1, maximize=True)
    keeper.update(torch.nn.Linear(2, 2), {"epoch": 2}, 2, 0.7)
    log = training.ModelLog("best", online=True)
    log.resume(run, SimpleNamespace(keeper=keeper, artifact_name="model-again2"), logged_epoch=2)
    run.finish()
    assert asked == [f"{run.entity}/{run.wandb.project}/model-again2:epoch-2"]
    assert [epochs_of(a) for a in model_artifacts(out_dir)] == ([[2]] if again else [])
