"""train.py end to end in W&B's real offline mode; the run is read back with wandb's own reader."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, read_run, run_train
from models.checkpoint import load_checkpoint, load_model
from utils.runs import find_run_folder
from workflows.flags import parse_config

pytestmark = pytest.mark.slow


def merged(records, kind):
    out = {}
    for r in records:
        if r["type"] == kind:
            out.update(r[kind].get("update", {}))  # a summary record may only remove keys (a resumed attempt's)
    return out


def staged_table(records, summary, key) -> dict:
    """The table JSON W&B staged for `key` (its image cells point at staged PNGs of the same artifact)."""
    client_id = summary[f"{key}.artifact_path"].split("://")[1].split("/")[0]
    artifact = next(r["artifact"] for r in records
                    if r["type"] == "artifact" and r["artifact"]["client_id"] == client_id)
    files = {c["path"]: Path(c["local_path"]) for c in artifact["manifest"]["contents"]}
    table = json.loads(files[f"{key}.table.json"].read_text())
    return table, files


def test_competition_folder_run(competition, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(competition), "--model", TINY_MODEL, "--img_size", "32", "--epochs=3", "--workers=0",
            "--batch_size=32", "--lr=0.01", "--table_rows=20", "--keep_top_k=1", "--log_every=4", f"--out_dir={out}"]
    run_train(args)
    run_dir = next((out / "wandb").glob("offline-run-*"))
    records = read_run(run_dir)
    run_id = run_dir.name.rsplit("-", 1)[1]

    config = merged(records, "config") | next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    assert config["model"] == TINY_MODEL and config["img_size"] == 32 and config["epochs"] == 3
    assert (config["lr"] == 0.01 and config["data"] == str(competition)
            and merged(records, "config")["pretrained"] == "false")

    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    history = [h for h in rows if "epoch" in h]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert {"train/loss", "val/loss", "val/acc", "val/f1_macro", "val/acsa", "lr", "val/f1/zero"} <= set(h)
    # a row every 4 optimizer steps (6 an epoch) against its own step; the epoch's lr is its last step's, not the
    # warm-up's 0 at its start
    steps = [h for h in rows if "global_step" in h]
    assert [h["global_step"] for h in steps] == [4, 8, 12, 16]
    assert all(h["train/loss_step"] > 0 and h["train/lr_step"] > 0 for h in steps)
    assert 0 < steps[0]["train/lr_step"] < history[0]["lr"] <= 0.01  # warming up, then the last step's

    summary = merged(records, "summary")
    scores = [h["val/f1_macro"] for h in history]
    assert summary["val/f1_macro"] == max(scores)
    assert summary["best_epoch"] == 1 + scores.index(max(scores))
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]

    table, files = staged_table(records, summary, "val/predictions")
    assert {"id", "image", "true", "pred", "confidence", "correct", "p_zero", "p_nine"} <= set(table["columns"])
    assert 0 < len(table["data"]) <= 20
    col = {c: i for i, c in enumerate(table["columns"])}
    image_cell = table["data"][0][col["image"]]
    assert image_cell["_type"] == "image-file" and files[image_cell["path"]].stat().st_size > 0
    wrong, wrong_files = staged_table(records, summary, "val/misclassified")
    wcol = {c: i for i, c in enumerate(wrong["columns"])}
    assert wrong["data"] and all(row[wcol["true"]] != row[wcol["pred"]] for row in wrong["data"])
    # one image per sample, shared by both tables: each table's artifact still holds the file its cells name
    assert all(wrong_files[row[wcol["image"]]["path"]].stat().st_size > 0 for row in wrong["data"])
    assert "val/confusion_matrix_table.artifact_path" in summary and "val/per_class.artifact_path" in summary
    assert "val/per_class_f1_table.artifact_path" in summary  # the per-class F1 bar chart's data
    pairs, pair_files = staged_table(records, summary, "val/confused_pairs")
    pcol = {c: i for i, c in enumerate(pairs["columns"])}
    counts = [row[pcol["count"]] for row in pairs["data"]]
    wrong_pairs = [(row[wcol["true"]], row[wcol["pred"]]) for row in wrong["data"]]
    assert counts == sorted(counts, reverse=True) and 1 <= len(counts) <= 10
    for row in pairs["data"]:  # the misclassified table holds the most confident mistakes: a subset of each pair
        assert row[pcol["true"]] != row[pcol["predicted"]]
        assert row[pcol["count"]] >= wrong_pairs.count((row[pcol["true"]], row[pcol["predicted"]]))
    top = pairs["data"][0]
    assert pair_files[top[pcol["example_1"]]["path"]].stat().st_size > 0

    models = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["name"] == f"model-{run_id}"]
    best_artifact = [a for a in models if "best" in a["aliases"]][-1]
    assert f"epoch-{summary['best_epoch']}" in best_artifact["aliases"]
    staged_ckpt = Path(best_artifact["manifest"]["contents"][0]["local_path"])
    assert staged_ckpt.read_bytes() == (out / "best.safetensors").read_bytes()
    assert staged_ckpt.is_relative_to(out)  # staged under the run's own folder: copy it and sync it whole
    assert json.loads(best_artifact["metadata"])["classes"][0] == "zero"

    # the checkpoint alone rebuilds the model; its validation predictions equal the logged ones
    from datasets import ImageDataset, load_data, split_indices
    from datasets.transforms import eval_transform
    from workflows.config import Config
    model, meta = load_model(out / "best.safetensors")
    cfg = Config.from_dict(meta["config"])
    data = load_data(cfg.data, cfg.image_col, cfg.label_col, cfg.group_col)
    _, val_idx = split_indices(data.labels, data.groups, cfg.val_fraction, cfg.folds, cfg.fold, cfg.seed)
    by_id = {data.ids[i]: i for i in val_idx}
    rows = [by_id[row[col["id"]]] for row in table["data"]]
    ds = ImageDataset([data.items[i] for i in rows], data.labels[rows],
                      eval_transform(meta["img_size"], meta["mean"], meta["std"]))
    with torch.no_grad():
        probs = model(torch.stack([ds[i][0] for i in range(len(ds))])).softmax(1).numpy()
    assert [meta["classes"][p] for p in probs.argmax(1)] == [row[col["pred"]] for row in table["data"]]
    logged = np.array([[row[col[f"p_{c}"]] for c in meta["classes"]] for row in table["data"]])
    np.testing.assert_allclose(probs, logged, atol=1e-5)
    # the confused pairs are the whole validation set's most frequent mistakes
    vds = ImageDataset([data.items[i] for i in val_idx], data.labels[val_idx], ds.transform)
    with torch.no_grad():
        vpred = model(torch.stack([vds[i][0] for i in range(len(vds))])).argmax(1).numpy()
    mistakes = [(meta["classes"][t], meta["classes"][p]) for t, p in zip(data.labels[val_idx], vpred) if t != p]
    index = meta["classes"].index
    expected = sorted({(mistakes.count(m), m) for m in mistakes}, key=lambda c: (-c[0], index(c[1][0]), index(c[1][1])))
    assert [(row[pcol["count"]], (row[pcol["true"]], row[pcol["predicted"]])) for row in pairs["data"]] == expected[:10]

    with open(competition / "sample_submission.csv") as fh:
        sample_ids = [r["ID"] for r in csv.DictReader(fh)]
    with open(out / "submission.csv") as fh:
        sub = list(csv.DictReader(fh))
    assert [r["ID"] for r in sub] == sample_ids
    assert {int(r["target"]) for r in sub} <= set(range(10))
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "best.safetensors", f"epoch-{summary['best_epoch']:03d}.safetensors", "last.safetensors"]


def test_digits_demo_logs_test_scores(tmp_path):
    out = tmp_path / "out"
    proc = run_train(["--model", TINY_MODEL, "--img_size=32", "--epochs=1", "--workers=0", "--table_rows=5",
                      f"--out_dir={out}"])
    # the end says where the results are and what comes next, with commands that run as written
    assert f"results in {out}/: report.html" in proc.stdout and "submission.csv" in proc.stdout
    assert f"next: python predict.py {out} --data digits" in proc.stdout
    summary = merged(read_run(next((out / "wandb").glob("offline-run-*"))), "summary")
    assert 0 <= summary["test/f1_macro"] <= 1 and 0 <= summary["test/acc"] <= 1
    with open(out / "submission.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 360 and all(r["ID"].startswith("digit-") for r in rows)


def test_a_typo_in_the_data_or_the_model_fails_before_any_run_folder_exists(tmp_path):
    """Checked before a run folder or a W&B run exists: the journal gets no failed run from a typo."""
    for args, said in [(["--data", str(tmp_path / "nope")], f"--data {tmp_path / 'nope'}: not 'digits'"),
                       (["--model", "resnet181"], "unknown model 'resnet181'; close timm names: ['resnet18'"),
                       (["--pretrained_path", str(tmp_path / "w.pth")], "no such file")]:
        out = tmp_path / "out"
        proc = run_train([*args, f"--out_dir={out}"], check=False)
        assert proc.returncode == 1 and said in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()


def test_a_failure_inside_the_run_is_a_failed_w_and_b_run_with_its_error(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()  # a folder, but no classes in it: found when the data is read
    proc = run_train(["--data", str(tmp_path / "empty"), f"--out_dir={out}"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "no class folders" in proc.stderr
    records = read_run(next((out / "wandb").glob("offline-run-*")))
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [1]
    assert "no class folders" in merged(records, "summary")["error"]


def test_unknown_key_exits_before_any_run(tmp_path):
    proc = run_train(["--learning_rate=0.1", f"--out_dir={tmp_path / 'out'}"], check=False)
    assert proc.returncode == 2 and "--learning_rate" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_disabled_mode_still_saves_work_but_stages_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run_train(["--model", TINY_MODEL, "--img_size=32", "--epochs=1", "--workers=0", "--wandb_mode=disabled",
               "--run_name", "first try"], cwd=tmp_path)
    out, = (tmp_path / "runs").iterdir()  # no --out_dir: a folder named for what it holds, runs/<name>-<run id>
    assert re.fullmatch(r"first-try-[a-z0-9]{8}", out.name), out.name
    assert find_run_folder(tmp_path / "runs", out.name[-8:]) == out  # --parent <id> finds it
    # --config <run folder> replays it: its flags as given, a new folder of its own, the replayed run its parent
    replay = parse_config(["--config", str(out), "--epochs", "2"])
    given = json.loads((out / "run.json").read_text())["config"]
    assert replay.to_dict() == given | {"epochs": 2, "run_name": "", "parent": str(out)}
    # code.diff: only from a checkout with edits
    written = sorted(p.name for p in out.iterdir() if p.name != "code.diff")
    assert written == [".lock", "best.safetensors", "data_manifest.csv", "epoch-001.safetensors", "last.safetensors",
                       "metrics.jsonl", "report.html", "run.json", "submission.csv", "summary.json", "test_probs.csv"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # what a sweep runner reads
    summary = json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in rows] == [1] and summary["val/f1_macro"] == rows[0]["val/f1_macro"]
    assert summary["_exit_code"] == 0 and summary["best_epoch"] == 1


def test_compile_trains_and_saves_plain_weights(tmp_path, monkeypatch, competition):
    """torch.compile through its AOTAutograd tracing of forward and backward (what our step has to survive), with
    the eager backend after it: inductor's C++ code generation is torch's own and costs ~40 s cold on 2 CPU cores
    (a lent GPU machine is where to run it). The wrapper, and so the `_orig_mod.` keys a careless save would
    write, is the same."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{"backend": "aot_eager", **kw}))
    out = tmp_path / "out"
    proc = run_train(["--data", competition, "--model", TINY_MODEL, "--img_size=16", "--epochs=1", "--workers=0",
                      "--wandb_mode=disabled", "--compile=True", f"--out_dir={out}"])
    state, meta = load_checkpoint(out / "best.safetensors")
    assert not any(k.startswith("_orig_mod.") for k in state) and meta["config"]["compile"] is True
    load_model(out / "best.safetensors")  # rebuilds without torch.compile
    assert "best val/f1_macro" in proc.stdout
