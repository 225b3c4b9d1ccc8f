"""Lineage with real offline W&B runs: dataset artifacts, the data fingerprint (and its check on resume),
code state, the changed keys, and the journal of runs (of an offline sweep: test_sweep_e2e's killed-runner sweep)."""
import base64
import csv
import hashlib
import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from conftest import NAMES, TINY_MODEL, read_run, run_script, run_train
from datasets import load_data
from models.checkpoint import read_meta
from utils import tracking
from workflows.lineage import (
    MARKER_FILE,
    changes,
    code_state,
    compact,
    defaults,
    describe_changes,
    fingerprint,
    manifest,
)


def run_module(name: str, *args) -> subprocess.CompletedProcess:
    return run_script(name, args)


def config_of(records) -> dict:
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    return config


def data_rows(folder: Path) -> list[tuple]:
    return manifest(load_data(str(folder)))


def relabel(folder: Path, image_id: str, label) -> None:
    with open(folder / "train.csv") as fh:
        rows = list(csv.reader(fh))
    for row in rows:
        if row[0] == image_id:
            row[1] = str(label)
    with open(folder / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_register_logs_a_dataset_artifact_whose_table_lists_every_file(competition, tmp_path):
    proc = run_module("register", competition, "--name", "comp-train", "--out_dir", tmp_path / "reg")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"next: python train.py --data {competition} (linked to this version)"
    records = read_run(next((tmp_path / "reg" / "wandb").glob("offline-run-*")))
    [artifact] = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["type"] == "dataset" and artifact["name"] == "comp-train"
    files = {c["path"]: c for c in artifact["manifest"]["contents"]}

    with open(competition / "train.csv") as fh:
        train = {r["ID"]: NAMES[int(r["target"])] for r in csv.DictReader(fh)}
    with open(competition / "sample_submission.csv") as fh:
        test = [r["ID"] for r in csv.DictReader(fh)]
    expected = ({f"train/{i}" for i in train} | {f"test/{i}" for i in test}
                | {"train.csv", "meta.csv", "sample_submission.csv"})
    assert expected <= set(files)
    staged = files["train/tr_0007.png"]  # copied as it is: md5 and bytes
    assert Path(staged["local_path"]).read_bytes() == (competition / "train" / "tr_0007.png").read_bytes()
    assert (base64.b64decode(staged["digest"])
            == hashlib.md5((competition / "train" / "tr_0007.png").read_bytes()).digest())

    table = json.loads(Path(files["samples.table.json"]["local_path"]).read_text())
    col = {c: i for i, c in enumerate(table["columns"])}
    rows = {row[col["id"]]: row for row in table["data"]}
    assert len(table["data"]) == len(train) + len(test) and set(rows) == set(train) | set(test)
    assert all(rows[i][col["label"]] == y and rows[i][col["split"]] == "train" for i, y in train.items())
    assert all(rows[i][col["split"]] == "test" and rows[i][col["label"]] == "" for i in test)
    assert rows["tr_0007.png"][col["bytes"]] == (competition / "train" / "tr_0007.png").stat().st_size
    thumb = rows["te_0003.png"][col["image"]]
    assert thumb["_type"] == "image-file" and Path(files[thumb["path"]]["local_path"]).stat().st_size > 0

    digest = fingerprint(manifest(load_data(str(competition))), NAMES)["digest"]
    assert f"fp-{digest}" in artifact["aliases"] and json.loads(artifact["metadata"])["fingerprint"]["digest"] == digest
    assert json.loads((competition / MARKER_FILE).read_text())["digest"] == digest

    # large data: checksummed file:// references, nothing copied
    proc = run_module("register", competition, "--name", "comp-refs", "--files", "reference", "--thumbnails", "0",
                      "--out_dir", tmp_path / "refs")
    assert proc.returncode == 0, proc.stderr
    records = read_run(next((tmp_path / "refs" / "wandb").glob("offline-run-*")))
    [artifact] = [r["artifact"] for r in records if r["type"] == "artifact"]
    entry = next(c for c in artifact["manifest"]["contents"] if c["path"] == "train/tr_0007.png")
    assert entry["ref"] == (competition / "train" / "tr_0007.png").resolve().as_uri() and "local_path" not in entry
    assert (base64.b64decode(entry["digest"])
            == hashlib.md5((competition / "train" / "tr_0007.png").read_bytes()).digest())


@pytest.mark.slow
def test_runs_on_a_registered_folder_name_its_artifact_until_the_data_changes(competition, tmp_path):
    assert run_module("register", competition, "--name", "comp-train", "--out_dir", tmp_path / "reg").returncode == 0
    digest = json.loads((competition / MARKER_FILE).read_text())["digest"]
    args = ["--data", str(competition), "--model", TINY_MODEL, "--img_size", "32", "--epochs", "1", "--workers", "0",
            "--table_rows", "4"]
    run_train([*args, "--out_dir", str(tmp_path / "a")])
    data = json.loads((tmp_path / "a" / "run.json").read_text())["data"]
    assert data["artifact"] == f"sweepcls/comp-train:fp-{digest}" and data["digest"] == data["source_digest"] == digest

    relabel(competition, "tr_0003.png", (NAMES.index(data_rows(competition)[3][3]) + 1) % 10)
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("id,new_label\ntr_0009.png,exclude\n")
    proc = run_train([*args, "--out_dir", str(tmp_path / "b"), "--label_fixes", str(fixes)])
    assert f"{competition} changed since it was registered as dataset comp-train" in proc.stdout
    data = json.loads((tmp_path / "b" / "run.json").read_text())["data"]
    # what trained: one image fewer
    assert data["artifact"] is None and data["source_digest"] not in (digest, data["digest"])
    assert data["train_images"] == 239 and "tr_0009.png" not in (tmp_path / "b" / "data_manifest.csv").read_text()


def test_one_changed_label_changes_the_fingerprint(competition):
    rows = manifest(load_data(str(competition)))
    fp = fingerprint(rows, NAMES)
    assert fingerprint(manifest(load_data(str(competition))), NAMES) == fp  # the same folder, the same digest
    relabel(competition, "tr_0003.png", (NAMES.index(rows[3][3]) + 1) % 10)
    changed = manifest(load_data(str(competition)))
    fp2 = fingerprint(changed, NAMES)
    assert fp2["digest"] != fp["digest"] and fp2["labels"] != fp["labels"] and fp2["files"] == fp["files"]
    assert (describe_changes(rows, changed)
            == f"1 label(s) changed (e.g. train/tr_0003.png: {rows[3][3]} -> {changed[3][3]})")
    (competition / "train" / "tr_0005.png").write_bytes((competition / "train" / "tr_0006.png").read_bytes() + b"\0")
    assert fingerprint(manifest(load_data(str(competition))), NAMES)["files"] != fp["files"]
    assert describe_changes(rows, rows) == "" and "another order" in describe_changes(rows, rows[::-1])


def test_code_state_of_a_git_checkout(tmp_path):
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                                    capture_output=True, text=True, check=True).stdout.strip()
    assert code_state(tmp_path)["commit"] is None  # not a checkout: nothing to record
    git("init", "-q")
    (tmp_path / "model.py").write_text("width = 1\n")
    git("add", "model.py")
    git("commit", "-qm", "first")
    clean = code_state(tmp_path)
    assert clean["commit"] == git("rev-parse", "HEAD") and clean["dirty"] is False and clean["diff"] == ""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "img.png").write_bytes(b"png")  # data in the checkout is no code change
    (tmp_path / "data" / MARKER_FILE).write_text("{}")  # nor is a registered folder's marker
    assert code_state(tmp_path)["dirty"] is False
    (tmp_path / "model.py").write_text("width = 2\n")
    (tmp_path / "extra.py").write_text("")
    edited = code_state(tmp_path)
    assert (edited["dirty"] is True and "-width = 1\n+width = 2" in edited["diff"]
            and edited["untracked"] == ["extra.py"])


def test_changed_keys_of_a_run_with_two_overrides():
    cfg = defaults() | {"lr": 0.01, "epochs": 3, "workers": 0, "out_dir": "/x", "data": "/comp", "notes": "n"}
    assert compact(changes(cfg, defaults())) == "epochs=3 lr=0.01"  # bookkeeping and data location are no change
    assert compact(changes(defaults(), defaults())) == ""
    assert compact(changes(defaults() | {"group_col": "", "folds": 5}, defaults() | {"group_col": "person"})) == \
        "group_col='' folds=5"


@pytest.mark.slow
def test_run_records_changes_parent_notes_code_and_data(tmp_path):
    """Five overrides (run_train's --final_fit false among them; bookkeeping flags are no change) on the digits demo;
    a child run of it."""
    common = ["--model", TINY_MODEL, "--img_size", "32", "--epochs", "1", "--workers", "0", "--cache", "ram",
              "--table_rows", "4"]
    run_train([*common, "--lr", "0.01", "--out_dir", str(tmp_path / "a"), "--notes", "hypothesis: a higher lr helps",
               "--tags", "lr,probe"])
    run_dir = next((tmp_path / "a" / "wandb").glob("offline-run-*"))
    records = read_run(run_dir)
    config, run = config_of(records), next(r["run"] for r in records if r["type"] == "run")
    assert (run_dir / "files" / "code" / "train.py").is_file()  # W&B's code saving
    assert (run_dir / "files" / "data_manifest.csv").read_text() == (tmp_path / "a" / "data_manifest.csv").read_text()
    assert config["changed"] == f"final_fit=false img_size=32 model={TINY_MODEL} epochs=1 lr=0.01"
    assert config["changed_keys"] == ["final_fit", "img_size", "model", "epochs", "lr"]
    assert run["notes"] == "hypothesis: a higher lr helps" and run["tags"] == ["lr", "probe"]
    code = code_state()  # of this checkout, as the run saw it (the tests change no file)
    head, dirty = code["commit"], code["dirty"]
    assert config["code"] == {"commit": head, "branch": code["branch"], "dirty": dirty} and len(head) == 40
    digits = fingerprint(manifest(load_data("digits")), [str(d) for d in range(10)])
    assert (config["data_fingerprint"]["digest"] == digits["digest"]
            and config["data_fingerprint"]["split"]["seed"] == 42)
    meta = read_meta(tmp_path / "a" / "best.safetensors")["lineage"]
    assert (meta["code"]["commit"] == head and meta["code"]["dirty"] == dirty
            and meta["data"]["digest"] == digits["digest"])
    assert meta["code"]["diff_sha256"] == hashlib.sha256(code["diff"].encode()).hexdigest()
    assert (tmp_path / "a" / "code.diff").is_file() == dirty
    model = next(r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "model")
    assert json.loads(model["metadata"])["lineage"]["code"]["commit"] == head  # and no diff in W&B's metadata
    assert "diff" not in json.loads(model["metadata"])["lineage"]["code"]

    child = run_train([*common, "--lr", "0.02", "--out_dir", str(tmp_path / "b"), "--parent", str(tmp_path / "a")])
    config = config_of(read_run(next((tmp_path / "b" / "wandb").glob("offline-run-*"))))
    parent_id = json.loads((tmp_path / "a" / "run.json").read_text())["run_id"]
    assert config["changed"] == f"final_fit=false img_size=32 model={TINY_MODEL} epochs=1 lr=0.02"
    assert config["changed_vs_parent"] == "lr=0.02"
    assert config["parent_run"] == parent_id and "vs parent" in child.stdout

    journal = run_module("journal", "--runs", tmp_path)
    assert journal.returncode == 0, journal.stderr
    rows = {cells[2]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                          for line in journal.stdout.splitlines()
                                          if line.startswith("| ") and not line.startswith("| #"))}
    scores = {d: json.loads((tmp_path / d / "summary.json").read_text())["val/f1_macro"] for d in "ab"}
    child_id = json.loads((tmp_path / "b" / "run.json").read_text())["run_id"]
    assert rows[parent_id][7] == "hypothesis: a higher lr helps [lr, probe]"
    assert rows[child_id][6] == f"{scores['b'] - scores['a']:+.4f} vs {parent_id} (parent)"
    assert (tmp_path / "journal.md").read_text() in journal.stdout


@pytest.mark.slow
def test_resume_on_changed_data_warns(tmp_path, competition):
    from test_resume import ARGS, stopped_in_epoch_2
    out = tmp_path / "run"
    stopped_in_epoch_2(competition, out)
    before = manifest(load_data(str(competition)))
    relabel(competition, "tr_0003.png", (NAMES.index(before[3][3]) + 1) % 10)
    proc = run_train(["--data", str(competition), *ARGS, "--workers", "0", "--out_dir", str(out)])
    relabelled = NAMES[(NAMES.index(before[3][3]) + 1) % 10]
    expected = f"1 label(s) changed (e.g. train/tr_0003.png: {before[3][3]} -> {relabelled})"
    assert f"warning: the data changed since this run started: {expected}" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["data_changed_on_resume"] == expected
    assert "resumed at epoch 2" in proc.stdout


class FakeRun:
    def __init__(self, id, created, config, summary, notes="", tags=()):
        self.id, self.created_at, self.config, self.summary = id, created, config, summary
        self.notes, self.tags, self.state, self.entity, self.project = notes, list(tags), "finished", "team", "comp"


def test_journal_reads_a_project_from_the_wandb_api(tmp_path, monkeypatch, capsys):
    import journal
    base = defaults() | {"epochs": 5}
    runs = [FakeRun("r1", "2026-11-20T10:00:00Z", base | {"changed": "epochs=5", "changed_keys": ["epochs"]},
                    {"val/f1_macro": 0.80, "best_epoch": 3}, "baseline"),
            FakeRun("r2", "2026-11-21T10:00:00", base | {"lr": 0.01, "changed_keys": ["epochs", "lr"],
                                                          "parent_run": "r1",
                                                          "code": {"commit": "abcdef0123", "dirty": True}},
                    {"val/f1_macro": 0.85, "best_epoch": 4}, "higher lr", ["lr"]),
            FakeRun("e1", "2026-11-22T10:00:00Z", {"members": ["x"]}, {})]  # an ensemble run: not listed

    class FakeApi:
        def runs(self, path, order=None, per_page=50, lazy=True):
            assert path == "team/comp" and order == "+created_at"
            assert not lazy  # a lazy page asks again for each run's config and summary
            return runs
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: FakeApi())
    assert journal.main(["--project", "comp", "--entity", "team", "--out", str(tmp_path / "j.md")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and not line.startswith("| #")]
    assert len(lines) == 2
    r2 = [c.strip() for c in lines[1].split("|")[1:-1]]
    noon_utc = datetime(2026, 11, 21, 10, tzinfo=UTC).timestamp()  # W&B's created_at is UTC, zone or not
    assert r2[1] == time.strftime("%Y-%m-%d %H:%M", time.localtime(noon_utc))
    assert r2[2:8] == ["r2", "finished", "lr=0.01", "**0.8500**", "+0.0500 vs r1 (parent)", "higher lr [lr]"]
    assert r2[9:] == ["abcdef01+dirty", "team/comp/model-r2:best"]
    assert "Every run changes: `epochs=5`." in (tmp_path / "j.md").read_text()


def test_auc_is_one_vs_rest_macro_and_defined_when_a_class_is_missing():
    from sklearn.metrics import roc_auc_score

    from utils.metrics import classification_metrics
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300) + np.eye(4)[y] * rng.uniform(0, 0.5, (300, 1))
    probs /= probs.sum(1, keepdims=True)
    assert classification_metrics(y, probs)["auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    keep = y != 2  # a split without class 2: the mean over the classes present
    m = classification_metrics(y[keep], probs[keep])
    assert np.isnan(m["auc"][2]) and m["auc_macro"] == pytest.approx(np.mean(m["auc"][[0, 1, 3]]))


def test_wandb_dataset_ref_needs_online_mode(tmp_path):
    proc = run_train(["--data", "wandb:team/comp/train-images:latest", "--out_dir", str(tmp_path / "x")], check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --data wandb:team/comp/train-images:latest needs W&B online")
    assert "`wandb artifact get team/comp/train-images:latest --root DIR`" in proc.stderr
