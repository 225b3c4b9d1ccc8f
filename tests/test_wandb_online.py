"""The online W&B path as far as it runs here (real SDK, offline): the project a sweep and its runs share, what
train.py passes to wandb.init under `wandb agent`, the sync hint of a resumed run, tables over W&B's row limit,
a crash's traceback and console in the run, the agent's second stop signal."""
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import wandb
import yaml

from conftest import ROOT, read_run
from utils import tracking
from utils.metrics import Predictions, classification_metrics
from utils.runs import DEFAULT_PROJECT, random_id
from utils.stop import Stopped, StopSignal


def test_sweep_yaml_names_the_project_runs_go_to():
    sweep = yaml.safe_load((ROOT / "sweep.yaml").read_text())
    assert sweep["project"] == DEFAULT_PROJECT  # `wandb sweep` would otherwise name it after the checkout's folder


def test_under_the_agent_neither_project_nor_run_id_is_passed(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_SILENT")  # wandb's own warnings are what this looks for
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun")
    run = tracking.init({"model": "m"}, "agentrun", tmp_path / "run", "offline",
                        tracking.RunOptions(project="elsewhere", entity="team"))
    assert run.id == "agentrun"
    assert run.finish() == 0
    out = capfd.readouterr()
    assert "Ignoring" not in out.out + out.err


def test_what_auto_resolved_to_reaches_the_config_under_keys_a_sweep_does_not_lock(tmp_path, monkeypatch, capfd):
    """The shipped sweep.yaml sets img_size: 0; wandb locks a sweep's keys (WANDB_SWEEP_PARAM_PATH, which the agent
    writes) and drops updates to them, warning. The size trained at must still reach the dashboard."""
    from types import SimpleNamespace

    from workflows.config import Config
    from workflows.prepare import resolve_auto
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"img_size": {"value": 0}, "model": {"value": "auto"}}))
    monkeypatch.delenv("WANDB_SILENT")  # wandb's own warnings are what this looks for
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    monkeypatch.setenv("WANDB_RUN_ID", "resolved1")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    cfg = Config(data="/comp", img_size=0, model="auto", pretrained="false")
    run = tracking.init(dataclasses.asdict(cfg), "resolved1", tmp_path / "run", "offline")
    data = SimpleNamespace(items=[np.zeros((100, 90, 3), np.uint8)] * 4, test_items=[])
    cfg = resolve_auto(cfg, run, data)
    run.finish()
    records = read_run(next((tmp_path / "run").glob("wandb/offline-run-*")))
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    assert config["img_size"] == 0 and config["model"] == "auto"  # the sweep's, as wandb keeps them
    assert config["resolved/img_size"] == cfg.img_size > 0 and config["resolved/model"] == cfg.model != "auto"
    assert "ignored update" not in capfd.readouterr().err


def test_a_resumed_offline_run_says_how_to_sync_every_attempt(tmp_path, capsys):
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, "resumeme", out_dir, "offline")
    run.log({"epoch": 1, "val/acc": 0.5})
    state = run.position()
    run.finish()
    capsys.readouterr()
    run = tracking.init({"model": "m"}, "resumeme", out_dir, "offline", resume=state)
    run.log({"epoch": 2, "val/acc": 0.6})
    run.finish()
    hint = next(line for line in capsys.readouterr().out.splitlines() if "wandb sync" in line)
    path = Path(hint.split("wandb sync ", 1)[1].strip())
    attempts = {f.resolve() for f in path.glob("*/*.wandb")}  # what `wandb sync PATH` reads (latest-run: a link)
    assert len(attempts) == 2


def test_a_resumed_attempt_starts_without_how_the_last_one_ended(tmp_path):
    """A requeued trial that finishes must not show the last attempt's `preempted`, `stopped` or `error`: W&B copies
    a resumed run's summary back from the server (online) and merges a synced attempt into it (offline), so the new
    attempt removes those keys; its scores stay."""
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, "again1", out_dir, "offline")
    run.log({"epoch": 1, "val/acc": 0.5})
    run.set_summary({"preempted": True, "stopped": "SIGTERM during training", "val/best": 0.5})
    state = run.position()
    run.finish(exit_code=143)
    run = tracking.init({"model": "m"}, "again1", out_dir, "offline", resume=state)
    run.log({"epoch": 2, "val/acc": 0.6})
    assert run.finish() == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["val/best"] == 0.5 and not {"preempted", "stopped", "error"} & set(summary)
    records = read_run(sorted(out_dir.glob("wandb/offline-run-*"))[1])
    removed = {item.get("key") or item["nestedKey"][0]
               for r in records if r["type"] == "summary" for item in r["summary"].get("remove", [])}
    assert {"preempted", "stopped", "error", "wandb_unfinished"} <= removed, records


def test_a_table_over_the_row_limit_is_cut_with_a_note(tmp_path, capsys):
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out_dir, "offline")
    run.log_table("t", ["n"], [[i] for i in range(10_005)], full_copy=out_dir / "all.csv")
    run.finish()
    assert "the first 10,000 of 10,005 rows are logged" in capsys.readouterr().out
    (table,) = out_dir.glob("wandb/offline-run-*/files/media/table/t_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 10_000


def test_a_crash_reaches_wandb_before_the_run_finishes(tmp_path):
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out_dir, "offline")  # console capture on by default

    def work():
        print("epoch 1 done")
        raise RuntimeError("CUDA error: an illegal memory access")
    with pytest.raises(RuntimeError):
        run.run_to_end(work)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["_exit_code"] == 1 and summary["error"] == "RuntimeError: CUDA error: an illegal memory access"
    (files,) = out_dir.glob("wandb/offline-run-*/files")
    assert "illegal memory access" in (files / "traceback.txt").read_text()  # the W&B run's own copy
    assert "epoch 1 done" in (files / "output.log").read_text()


def test_a_second_stop_signal_is_noted_not_raised(capfd):
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # the agent's stop ...
        os.kill(os.getpid(), signal.SIGINT)  # ... and the run's stop poller a moment later: no KeyboardInterrupt
        with pytest.raises(Stopped) as e:
            stop.check()
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert "SIGINT noted: already stopping after SIGTERM" in capfd.readouterr().err


def test_short_epochs_hold_their_tables_and_the_last_best_still_gets_them(tmp_path):
    """W&B stages every image of every table again: with epochs shorter than the tables' cost / TABLES_SHARE a new
    best's tables are held (a newer best replacing them), and the fit's last epoch logs the newest."""
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out_dir, "offline")
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    images = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    sets = [rng.dirichlet(np.ones(4), 40) for _ in range(3)]
    for epoch, probs in enumerate(sets, 1):
        run.log_eval_tables("val", Predictions([f"s{i}" for i in range(40)], lambda r: images[r], y, probs,
                                               list("abcd")), classification_metrics(y, probs), max_rows=40)
        run.log({"epoch": epoch})
        run.writer.drain()  # the first set's cost is known before the next best
    assert run.tables_seconds > 0 and set(run.pending_tables) == {"val"}
    run.log_pending_tables("val")  # the last epoch, not a new best
    run.log({"epoch": 4})
    run.finish()
    logged = [r["history"] for r in read_run(next(out_dir.glob("wandb/offline-run-*"))) if r["type"] == "history"]
    with_tables = [h for h in logged if "val/predictions" in json.dumps(h)]
    assert len(with_tables) == 2  # the first best, and the newest at the end; not the one in between
    (files,) = out_dir.glob("wandb/offline-run-*/files")
    last = json.loads((files / with_tables[-1]["item"]["val/predictions.path"]).read_text())
    confidences = [row[4] for row in last["data"]]
    assert confidences == pytest.approx(sets[2].max(1).tolist())


def test_a_confusion_matrix_over_wandbs_row_limit_keeps_the_most_confused_classes(tmp_path, capsys):
    """110 classes make 12,100 (true, pred) rows, and W&B keeps 10,000 of a table, silently: W&B gets the 100 most
    confused classes, and the console says so."""
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out_dir, "offline")
    n = 110
    y = np.repeat(np.arange(n), 3)
    probs = np.eye(n)[y] * 0.9 + 0.1 / n
    probs[y == 7] = np.eye(n)[42] * 0.9 + 0.1 / n  # class 7 read as 42: both must stay
    classes = [f"c{i}" for i in range(n)]
    images = np.zeros((len(y), 8, 8, 3), np.uint8)
    run.log_eval_tables("val", Predictions([f"s{i}" for i in range(len(y))], lambda r: images[r], y, probs, classes),
                        classification_metrics(y, probs), max_rows=5, hold=False)
    run.log({"epoch": 1})
    run.finish()
    assert "the 100 most confused of 110 classes" in capsys.readouterr().out
    (table,) = out_dir.glob("wandb/offline-run-*/files/media/table/val/confusion_matrix_table_*.table.json")
    rows = json.loads(table.read_text())["data"]
    assert len(rows) <= 10_000
    assert any(row[0] == "c7" and row[1] == "c42" and row[2] == 3 for row in rows)


def test_a_dataset_samples_table_over_wandbs_artifact_limit_is_cut_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wandb.Table, "MAX_ARTIFACT_ROWS", 50)  # W&B's limit (200,000), made small enough to reach
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out_dir, "offline")
    run.log_dataset("comp", [], ["id", "label"], [[f"s{i}", i % 3] for i in range(60)], {})
    run.finish()
    assert "the first 50 of 60 images" in capsys.readouterr().out


def test_an_input_artifact_never_holds_the_run_for_its_upload(tmp_path, monkeypatch):
    """--pseudo_labels FILE online: the file becomes an input of the run. wandb's use_artifact of a local file waits
    for its upload with no time-out, on the run's W&B writer thread: an upload that does not end (faked: an
    artifact.wait that never returns) must not hold training, nor the finish."""
    import threading
    import time as clock
    monkeypatch.setattr(wandb.Artifact, "wait", lambda self, timeout=None: clock.sleep(3600))
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, random_id(), out_dir, "offline")
    monkeypatch.setattr(tracking.Run, "mode", property(lambda self: "online"))  # the online path, recorded offline
    labels = tmp_path / "pseudo.csv"
    labels.write_text("id,label\na,1\n")
    done = []
    worker = threading.Thread(target=lambda: (run.use_file(labels, "pseudo-labels-x", "pseudo-labels"),
                                              run.log({"epoch": 1}), done.append(run.finish())), daemon=True)
    worker.start()
    worker.join(60)
    assert done == [0], "the input artifact held the run, or failed it"
    records = read_run(next(out_dir.glob("wandb/offline-run-*")))
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["name"] == "pseudo-labels-x" and artifact.get("use_after_commit")
