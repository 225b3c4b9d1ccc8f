"""W&B calls run on a background writer thread: in order, errors surface, the step count the resume
state records is W&B's own, and an artifact holds the file as it was when it was logged."""
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import read_run
from utils import tracking
from utils.background import BackgroundWriter
from utils.files import atomic_write_bytes
from utils.runs import random_id


def test_writer_runs_in_order_and_raises_a_failure_once():
    writer, seen = BackgroundWriter("test", backlog=2), []
    main = threading.current_thread()
    for i in range(5):
        writer.submit(lambda i=i: seen.append((i, threading.current_thread() is main)))

    def fail():
        raise OSError("disk full")
    hold = threading.Event()
    writer.submit(hold.wait)
    writer.submit(fail)
    writer.submit(lambda: seen.append("after"))  # queued behind the failure: dropped
    hold.set()
    writer.queue.join()
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: None)
    writer.submit(lambda: seen.append("later"))  # raised once; then the writer goes on
    writer.close()
    assert seen == [(i, False) for i in range(5)] + ["later"]


def test_step_count_and_artifact_snapshot(tmp_path):
    out = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out, "offline")
    ckpt = out / "best.safetensors"
    ckpt.write_bytes(b"epoch 1 weights")
    for epoch in (1, 2, 3):
        run.log({"epoch": epoch, "val/acc": epoch / 10})
    run.log_table("t", ["image", "n"], [[np.zeros((8, 8, 3), np.uint8), 1]])
    run.log_artifact(ckpt, "model-x", "model", aliases=["best"])
    atomic_write_bytes(ckpt, b"epoch 2 weights")  # replaced (as the keeper does) before the writer may have staged it
    step = run.position()["wandb_step"]
    run.writer.queue.join()
    assert step == run.step == 4  # 3 rows and the table's row
    assert run.finish() == 0
    records = read_run(next((out / "wandb").glob("offline-run-*")))
    artifact = next(r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["name"] == "model-x")
    (entry,) = artifact["manifest"]["contents"]
    assert entry["path"] == "best.safetensors" and Path(entry["local_path"]).read_bytes() == b"epoch 1 weights"
    assert not list(out.glob(".best.safetensors.artifact-*"))  # the snapshot link is gone
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert ([(h["_step"], h.get("epoch")) for h in rows] == [(0, 1), (1, 2), (2, 3), (3, None)]
            and "t.artifact_path" in rows[3])


def test_private_wandb_uses_name_the_release_line_they_were_checked_against():
    from utils.tracking import private
    assert private.version_checked() and private.version_checked("0.31.9rc1")
    assert not private.version_checked("0.32.0") and not private.version_checked("1.31.0")


def test_step_rows_have_their_own_step_metric_and_stay_out_of_the_plain_record(tmp_path):
    out = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out, "offline")
    for step in (1, 2):
        run.log_step("fold0/", step * 20, {"train/loss_step": 1.0 / step, "train/lr_step": 0.01})
    run.log({"fold0/epoch": 1, "fold0/train/loss": 0.7})
    assert run.position()["wandb_step"] == 3 and run.finish() == 0
    assert [sorted(set(r) - {"_time"}) for r in run.history()] == [["fold0/epoch", "fold0/train/loss"]]  # epoch rows
    records = read_run(next((out / "wandb").glob("offline-run-*")))
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [(h["_step"], h.get("fold0/global_step")) for h in rows] == [(0, 20), (1, 40), (2, None)]
    metrics = {m["metric"].get("name"): m["metric"].get("step_metric") for m in records if m["type"] == "metric"}
    # explicit: the fold* -> epoch glob does not take them
    assert metrics["fold0/train/loss_step"] == metrics["fold0/train/lr_step"] == "fold0/global_step"
    assert "fold0/global_step" in metrics and metrics.get("fold0/train/loss") in (None, "epoch")
