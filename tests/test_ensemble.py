"""predict.py and ensemble.py: members from files, run dirs, sweeps and (through a fake W&B API, the one
seam that cannot run here) online artifacts; Caruana weights; the prediction cache; end to end offline."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_e2e import staged_table

import ensemble as ensemble_cli
import predict as predict_cli
from conftest import TINY_MODEL, read_run, run_train
from models import build_model
from models.checkpoint import checkpoint_bytes
from utils import UserError, tracking
from utils.files import atomic_write_bytes
from workflows.ensemble import caruana, check_compatible, member_probs, resolve_member, score, sweep_member_refs


def random_probs(rng, n, k, sharp):
    logits = rng.normal(size=(n, k)) * sharp
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.parametrize("seed", range(6))
def test_auto_weights_never_score_below_the_best_member(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 80)
    probs = []
    for sharp in (1.0, 2.0, 3.0):  # members of different skill: a noisy copy of the truth
        p = random_probs(rng, 80, 5, sharp)
        p[np.arange(80), labels] += rng.uniform(0, 0.6, 80)
        probs.append(p / p.sum(1, keepdims=True))
    w = caruana(probs, labels, "f1_macro")
    assert w.min() >= 0 and w.sum() == pytest.approx(1)
    ens = sum(wi * p for wi, p in zip(w, probs))
    assert score("f1_macro", labels, ens) >= max(score("f1_macro", labels, p) for p in probs)


def test_a_member_with_itself_is_that_member():
    rng = np.random.default_rng(0)
    p, labels = random_probs(rng, 50, 4, 2.0), rng.integers(0, 4, 50)
    w = caruana([p, p], labels)
    assert np.allclose(w[0] * p + w[1] * p, p)


def save_checkpoint(path: Path, classes: list[str], img_size: int = 32) -> Path:
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, num_classes=len(classes))
    meta = {"format": "sweepcls/1", "model": TINY_MODEL, "classes": classes, "targets": list(range(len(classes))),
            "img_size": img_size, "mean": [0.5] * 3, "std": [0.25] * 3, "config": {"monitor": "val/f1_macro"}}
    atomic_write_bytes(path, checkpoint_bytes(model, meta))
    return path


def test_members_with_different_classes_are_refused(tmp_path):
    a = resolve_member(str(save_checkpoint(tmp_path / "a.safetensors", ["cat", "dog"])), tmp_path)
    b = resolve_member(str(save_checkpoint(tmp_path / "b.safetensors", ["cat", "fox"])), tmp_path)
    with pytest.raises(UserError, match=r"members disagree on the classes: a.safetensors has \['cat', 'dog'\], "
                                        r"b.safetensors has \['cat', 'fox'\]"):
        check_compatible([a, b])


def test_unknown_member_is_one_clear_error(tmp_path, capsys):
    assert ensemble_cli.main([str(tmp_path / "nope"), "--data", "digits", "--wandb_mode", "disabled"]) == 1
    assert "no such file or folder, and not a W&B artifact ref" in capsys.readouterr().err


def test_predictions_are_cached_per_member_images_and_tta(tmp_path, monkeypatch):
    member = resolve_member(str(save_checkpoint(tmp_path / "m.safetensors", ["a", "b", "c"])), tmp_path)
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    first = member_probs(member, items, "none", tmp_path / "cache")

    def no_inference(*a, **k):
        raise AssertionError("inference ran again")
    monkeypatch.setattr("models.checkpoint.load_model", no_inference)
    assert np.array_equal(member_probs(member, items, "none", tmp_path / "cache"), first)
    with pytest.raises(AssertionError, match="inference ran again"):  # other TTA: another cache entry
        member_probs(member, items, "flip", tmp_path / "cache")


class FakeArtifact:
    """wandb.Artifact as the public API returns it: name COLLECTION:vN, type, aliases (no vN), state, download."""
    def __init__(self, source: Path | None, name: str = "", type: str = "model", aliases=("best", "latest"),
                 state: str = "COMMITTED"):
        self.source, self.name, self.type, self.aliases, self.state = source, name, type, list(aliases), state

    def download(self, root: str) -> str:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(self.source, Path(root) / "best.safetensors")
        return root


class FakeRun:
    """wandb.apis.public.Run: id, state, config, summary, logged_artifacts() (by default its model-<id>:v0)."""
    def __init__(self, run_id, summary, state="finished", config=None, artifacts=None):
        self.id, self.summary, self.state, self.config = run_id, summary, state, config or {}
        self.artifacts = [FakeArtifact(None, f"model-{run_id}:v0")] if artifacts is None else artifacts

    def logged_artifacts(self, per_page: int = 100):
        return list(self.artifacts)


class FakeSweep:
    config = {"metric": {"name": "val/f1_macro", "goal": "maximize"}}

    @property
    def runs(self):  # wandb's Sweep.runs: pages of 10, then one request per run for its summary
        raise AssertionError("Sweep.runs asks the server once per run: api.runs with the sweep as a filter")


SWEEP_RUNS = [FakeRun("r1", {"val/f1_macro": 0.7}), FakeRun("r2", {"val/f1_macro": 0.9}), FakeRun("r3", {}),
              FakeRun("r4", {"val/f1_macro": 0.8})]


class FakeApi:
    """wandb.Api's surface that tracking uses: artifact(ref).download(root), sweep(path).config and runs(project,
    filters) as the server answers it (the sweep's runs in the state asked for); `files` serves some refs their own
    checkpoint (others get `checkpoint`)."""
    def __init__(self, checkpoint: Path, runs=None, files=None):
        self.checkpoint, self.runs_of_sweep, self.files, self.asked = checkpoint, runs, files or {}, []

    def artifact(self, ref):
        self.asked.append(ref)
        return FakeArtifact(self.files.get(ref, self.checkpoint))

    def sweep(self, path):
        self.asked.append(path)
        return FakeSweep()

    def runs(self, path, filters=None, order="+created_at", per_page=50, lazy=True):
        self.asked.append(("runs", path, filters, lazy))
        (sweep,), (state,) = (f.values() for f in filters["$and"])
        return [r for r in (SWEEP_RUNS if self.runs_of_sweep is None else self.runs_of_sweep) if r.state == state]


def test_online_members_are_pulled_with_the_wandb_api(tmp_path, monkeypatch):
    api = FakeApi(save_checkpoint(tmp_path / "remote.safetensors", ["a", "b"]))
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: api)
    refs = sweep_member_refs("team/comp/sw123", 2)
    assert refs == ["team/comp/model-r2:best", "team/comp/model-r4:best"]  # by the sweep's own metric, best first
    member = resolve_member(refs[0], tmp_path / "cache")
    assert member.meta["classes"] == ["a", "b"] and member.paths[0].is_relative_to(tmp_path / "cache")
    assert api.asked == ["team/comp/sw123", ("runs", "team/comp", {"$and": [{"sweep": "sw123"}, {"state": "finished"}]},
                                             False), "team/comp/model-r2:best"]  # one request for the runs' summaries


def test_a_download_that_fails_is_one_error_line_naming_the_artifact(tmp_path, monkeypatch):
    class Unreachable(FakeArtifact):
        def download(self, root: str) -> str:
            raise ConnectionError("Connection reset by peer")
    api = FakeApi(tmp_path / "unused.safetensors")
    api.artifact = lambda ref: Unreachable(None)
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: api)
    with pytest.raises(UserError, match="cannot download W&B artifact team/comp/model-r2:best .*Connection reset"):
        resolve_member("team/comp/model-r2:best", tmp_path / "cache")


def test_online_sweep_members_are_its_best_finished_runs(tmp_path, monkeypatch):
    runs = [FakeRun(run_id, {"val/f1_macro": value}, state=state) for run_id, value, state in [
        ("crashed", 0.99, "crashed"), ("live", 0.98, "running"), ("r1", 0.7, "finished"), ("stopped", 0.97, "killed"),
        ("r2", 0.9, "finished"), ("broken", 0.96, "failed"), ("r4", 0.8, "finished")]]
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: FakeApi(tmp_path / "unused.safetensors", runs))
    assert sweep_member_refs("team/comp/sw123", 2) == ["team/comp/model-r2:best", "team/comp/model-r4:best"]


def test_an_online_cv_run_is_one_member_of_all_its_folds(tmp_path, monkeypatch, capsys):
    import json
    digits = [str(d) for d in range(10)]
    sources = {f"team/comp/model-{run_id}-fold{k}:best": save_checkpoint(tmp_path / f"{run_id}-{k}.safetensors",
                                                                         digits, img_size=32 + 8 * k)
               for run_id, n in [("cv1", 3), ("cv2", 2)] for k in range(n)}
    runs = [FakeRun("r2", {"val/f1_macro": 0.9}),
            FakeRun("cv1", {"val/f1_macro": 0.95}, config={"cv": True, "folds": 3},  # known by its config
                    artifacts=[FakeArtifact(None, f"model-cv1-fold{k}:v0") for k in (2, 0, 1)]
                    + [FakeArtifact(None, "oof-cv1:v0", type="oof", aliases=["latest"])]),
            FakeRun("cv2", {"val/f1_macro": 0.92},  # known by its fold artifacts alone
                    artifacts=[FakeArtifact(None, "model-cv2-fold1:v0"), FakeArtifact(None, "model-cv2-fold0:v1")])]
    api = FakeApi(tmp_path / "unused.safetensors", runs, sources)
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: api)
    cv1 = "+".join(f"team/comp/model-cv1-fold{k}:best" for k in range(3))
    cv2 = "team/comp/model-cv2-fold0:best+team/comp/model-cv2-fold1:best"
    assert sweep_member_refs("team/comp/sw123", 2) == [cv1, cv2]

    member = resolve_member(cv1, tmp_path / "cache")  # one member: the 3 folds' checkpoints, in fold order
    assert member.name == "team/comp/model-cv1-fold0+1+2:best" and len(member.paths) == 3
    assert all(p.is_relative_to(tmp_path / "cache") and p.read_bytes() == sources[ref].read_bytes()
               for p, ref in zip(member.paths, cv1.split("+")))
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    folds = [member_probs(resolve_member(str(sources[ref]), tmp_path), items, "none", None) for ref in cv1.split("+")]
    assert np.allclose(member_probs(member, items, "none", None), np.mean(folds, axis=0))  # the folds averaged

    out_dir = tmp_path / "ens"
    assert ensemble_cli.main(["--sweep", "team/comp/sw123", "--top", "2", "--data", "digits", "--out",
                              str(tmp_path / "s.csv"), "--cache_dir", str(tmp_path / "c"), "--out_dir",
                              str(out_dir)]) == 0
    names = ["team/comp/model-cv1-fold0+1+2:best", "team/comp/model-cv2-fold0+1:best"]
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("team/")]
    assert rows == names  # two members, not one per fold
    assert {f"test/{name.replace('/', '_')}/f1_macro" for name in names} <= set(
        json.loads((out_dir / "summary.json").read_text()))


def test_an_online_sweep_run_without_a_model_artifact_is_skipped(tmp_path, monkeypatch, capsys):
    runs = [FakeRun("r1", {"val/f1_macro": 0.7}), FakeRun("r4", {"val/f1_macro": 0.8}),
            FakeRun("r2", {"val/f1_macro": 0.9}, artifacts=[]),  # crashed before its first checkpoint
            FakeRun("r9", {"val/f1_macro": 0.85}, artifacts=[FakeArtifact(None, "model-r9:v0", state="DELETED")]),
            FakeRun("cvx", {"val/f1_macro": 0.83}, config={"cv": True, "folds": 3},
                    artifacts=[FakeArtifact(None, f"model-cvx-fold{k}:v0") for k in (0, 1)]),
            FakeRun("r0", {"val/f1_macro": 0.6})]
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: FakeApi(tmp_path / "unused.safetensors", runs))
    assert sweep_member_refs("team/comp/sw123", 2) == ["team/comp/model-r4:best", "team/comp/model-r1:best"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and [line.split("skipping run ")[1].split(":")[0] for line in err] == ["r2", "r9", "cvx"]
    assert "no model artifact model-r2:best" in err[0] and "model-cvx-fold2:best" in err[2]

    runs[:] = [run for run in runs if run.id in ("r2", "r9", "cvx")]  # none left to ensemble: one error line
    assert ensemble_cli.main(["--sweep", "team/comp/sw123", "--data", "digits", "--cache_dir",
                              str(tmp_path / "c"), "--wandb_mode", "disabled"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --sweep team/comp/sw123: no finished run with the sweep's metric and a model artifact "
                      "to ensemble"]


@pytest.mark.slow
def test_predict_and_ensemble_two_backbones_offline(tmp_path, competition, capsys):
    runs = {}
    for name, model, size in [("a", TINY_MODEL, "32"), ("b", "test_efficientnet", "48")]:
        runs[name] = tmp_path / name
        run_train(["--data", str(competition), "--model", model, "--img_size", size, "--epochs", "2", "--workers", "0",
                   "--table_rows", "4", "--out_dir", str(runs[name])])
    sample_ids = [r["ID"] for r in csv.DictReader(open(competition / "sample_submission.csv"))]

    def submission(path):
        rows = list(csv.DictReader(open(path)))
        assert [r["ID"] for r in rows] == sample_ids and all(r["target"].isdigit() for r in rows)
        return [r["target"] for r in rows]

    cache = tmp_path / "cache"
    assert predict_cli.main([str(runs["a"]), "--data", str(competition), "--out", str(tmp_path / "pa.csv"),
                             "--cache_dir", str(cache)]) == 0
    alone = submission(tmp_path / "pa.csv")
    assert ensemble_cli.main([str(runs["a"]), str(runs["a"]), "--data", str(competition),
                              "--out", str(tmp_path / "aa.csv"), "--cache_dir", str(cache), "--weights", "auto",
                              "--out_dir", str(tmp_path / "aa")]) == 0
    assert submission(tmp_path / "aa.csv") == alone

    out_dir = tmp_path / "ens"
    assert ensemble_cli.main([str(runs["a"]), str(runs["b"] / "best.safetensors"), "--data", str(competition),
                              "--weights", "auto", "--out", str(tmp_path / "ab.csv"), "--cache_dir", str(cache),
                              "--out_dir", str(out_dir)]) == 0
    submission(tmp_path / "ab.csv")
    last = capsys.readouterr().out.splitlines()[-2:]  # where the results are and what comes next, after W&B's footer
    assert last[0] == f"results in {tmp_path / 'ab.csv'}; the W&B run in {out_dir}/"
    assert last[1].startswith(f"next: submit {tmp_path / 'ab.csv'}; --save_probs FILE")
    records = read_run(next(out_dir.glob("wandb/offline-run-*")))
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["job_type"] == "ensemble"
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert {"val/a/f1_macro", "val/b/f1_macro", "val/ensemble/f1_macro"} <= set(summary)
    assert summary["val/ensemble/f1_macro"] >= max(summary["val/a/f1_macro"], summary["val/b/f1_macro"])
    table, _ = staged_table(records, summary, "test/disagreement")
    assert table["columns"] == ["id", "image", "ensemble", "ensemble_conf", "a pred", "a conf", "b pred", "b conf"]
    a_test = submission(tmp_path / "pa.csv")
    b_probs = member_probs(resolve_member(str(runs["b"]), cache), [competition / "test" / i for i in sample_ids],
                           "auto", cache, test_bn="auto")  # as the ensemble predicted it: what its run decided
    disagree = {i for i, a, b in zip(sample_ids, a_test, b_probs.argmax(1)) if a != str(b)}
    assert {row[0] for row in table["data"]} == disagree  # every test image the two members disagree on
    assert any(r["type"] == "artifact" and r["artifact"]["type"] == "submission" for r in records)


def test_offline_sweep_dir_gives_its_best_run_dirs(tmp_path):
    from workflows.sweep import SweepDir, Trial, write_json
    sdir = SweepDir(tmp_path / "sw")
    sweep = {"method": "random", "metric": {"name": "val/f1_macro", "goal": "maximize"},
             "parameters": {"lr": {"values": [0.1, 0.2, 0.3]}}}
    sdir.trials_dir.mkdir(parents=True)
    write_json(tmp_path / "sw" / "sweep.json", {"id": "x", "name": "sw", "source": "s.yaml", "sweep": sweep})
    for n, (run_id, value) in enumerate([("low", 0.5), ("high", 0.9), ("crashed", None), ("mid", 0.7)], 1):
        sdir.save(Trial(run_id, n, {"lr": 0.1 * n}, state="finished" if value else "failed"))
        (sdir.runs_dir / run_id).mkdir(parents=True)
        if value:
            save_checkpoint(sdir.runs_dir / run_id / "best.safetensors", ["a", "b"])
            write_json(sdir.runs_dir / run_id / "summary.json", {"val/f1_macro": value})
    refs = sweep_member_refs(str(tmp_path / "sw"), 2)
    assert refs == [str(sdir.runs_dir / "high"), str(sdir.runs_dir / "mid")]
    assert resolve_member(refs[0], tmp_path).name == "high"


def test_cross_validated_members_are_weighted_on_their_out_of_fold_predictions(tmp_path):
    from datasets import Data
    from ensemble import labelled_set
    ids, labels = ["x1", "x2", "x3", "x4"], np.array([0, 1, 1, 0])
    members = []
    for name, p1 in [("cv1", [0.9, 0.2, 0.4, 0.3]), ("cv2", [0.6, 0.7, 0.8, 0.1])]:
        run = tmp_path / name
        save_checkpoint(run / "fold0" / "best.safetensors", ["a", "b"])
        rows = [["id", "label", "fold", "p_a", "p_b"]]
        rows += [[i, "?", 0, 1 - p, p] for i, p in zip(reversed(ids), reversed(p1))]
        (run / "oof.csv").write_text("\n".join(",".join(map(str, r)) for r in rows))
        members.append(resolve_member(str(run), tmp_path))
    data = Data(classes=["a", "b"], targets=[0, 1], items=[None] * 4, labels=labels, ids=ids)
    name, got_labels, probs = labelled_set(members, data, None)
    assert name == "oof" and np.array_equal(got_labels, labels)
    assert np.allclose(probs[0][:, 1], [0.9, 0.2, 0.4, 0.3]) and np.allclose(probs[1][:, 1], [0.6, 0.7, 0.8, 0.1])
    plain = resolve_member(str(save_checkpoint(tmp_path / "plain.safetensors", ["a", "b"])), tmp_path)
    with pytest.raises(UserError, match="all cross-validated runs"):
        labelled_set([members[0], plain], data, None)


def test_predict_on_a_flat_folder_of_images(tmp_path, capsys):
    import cv2
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", ["cat", "dog", "fox"])
    folder = tmp_path / "test_images"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"img{i}.png"), np.full((40, 30, 3), 40 * i, np.uint8))
    assert predict_cli.main([str(checkpoint), "--data", str(folder), "--out", str(tmp_path / "s.csv"),
                             "--cache_dir", str(tmp_path / "cache")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert ([r["ID"] for r in rows] == [f"img{i}.png" for i in range(5)]
            and {r["target"] for r in rows} <= {"0", "1", "2"})
    assert "on 5 images" in capsys.readouterr().out


def test_a_corrupt_test_image_is_one_clear_error(tmp_path, competition, capsys):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", ["zero", "one", "two", "three", "four", "five", "six",
                                                               "seven", "eight", "nine"])
    (competition / "test" / "te_0001.png").write_bytes(b"garbage")
    assert predict_cli.main([str(checkpoint), "--data", str(competition), "--cache_dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "te_0001.png (UnidentifiedImageError" in err and "Traceback" not in err


def test_an_artifact_member_is_scored_under_its_ref(tmp_path, monkeypatch, capsys):
    import json
    digits = [str(d) for d in range(10)]
    api = FakeApi(save_checkpoint(tmp_path / "remote.safetensors", digits))
    monkeypatch.setattr(tracking.api, "wandb_api", lambda: api)
    local = save_checkpoint(tmp_path / "local.safetensors", digits)
    out_dir = tmp_path / "ens"
    assert ensemble_cli.main(["team/comp/model-r2:best", str(local), "--data", "digits",
                              "--out", str(tmp_path / "s.csv"), "--cache_dir", str(tmp_path / "c"),
                              "--out_dir", str(out_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads((out_dir / "summary.json").read_text())
    score = summary["test/team_comp_model-r2:best/f1_macro"]  # the ref's slashes stay out of the W&B key
    row = next(line for line in out if line.startswith("team/comp/model-r2:best"))
    assert row.split()[-1] == f"{score:.4f}"  # the printed table scores the member under its ref
