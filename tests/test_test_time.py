"""--test_bn auto and --tta auto: decided from the test set's measured shift at the end of a fit, the TTA candidate
checked on the validation images, recorded in best.safetensors; predict.py and ensemble.py read the decision back
(an older checkpoint: its measured shift alone), and an explicit value wins everywhere.

train.main runs in-process with W&B disabled on a small digits folder; the measure is replaced by a given shift,
so each case is certain and takes seconds (measuring itself: test_shift.py, test_shift_e2e.py)."""
import copy
import csv
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import ensemble
import predict
import train
from conftest import TINY_MODEL, make_competition_folder
from datasets.shift import OFF
from datasets.transforms import tta_for_shift
from models import batchnorm_layers, build_model
from models.checkpoint import CheckpointKeeper, checkpoint_bytes, read_meta, update_meta
from utils.files import atomic_write_bytes
from workflows import prepare, test_time, training

NOISE_AND_TURNS = {"turn": 1.0, "noise": 0.9}


def shift_of(**on) -> dict:
    """A measured shift as datasets/shift.py returns it, with the given operations on at probability p."""
    settings = {**copy.deepcopy(OFF), "noise_scale": 1.0}
    for op, p in on.items():
        settings[op] = {"p": p} if op in ("turn", "flip") else {"p": p, "magnitude": 0.1}
    return {"images": [100, 40], "gap": {}, "poses": {}, "settings": settings}


def one_hot(labels, n=3, right=None) -> np.ndarray:
    """Confident probabilities: the true class where `right` (default all), else the next one."""
    right = np.ones(len(labels), bool) if right is None else right
    return np.eye(n)[np.where(right, labels, (labels + 1) % n)] * 0.9 + 0.1 / n


# ----------------------------------------------------------------------------- the decisions themselves
@pytest.mark.parametrize("on,views", [({"turn": 1.0, "flip": 0.5}, "d4"), ({"turn": 0.6}, "rot4"),
                                      ({"flip": 0.4}, "flip"), ({"noise": 0.9}, "none"), (None, "none")])
def test_the_candidate_views_follow_the_measured_turns_and_mirrors(on, views):
    assert tta_for_shift(None if on is None else shift_of(**on)["settings"]) == views


def test_the_validation_check_drops_views_that_lower_macro_f1_beyond_chance_and_keeps_ties():
    labels = np.arange(60) % 3
    right = one_hot(labels)
    worse = one_hot(labels, right=np.arange(60) >= 20)  # 20 of 60 wrong: lower in every resample
    tta, why, scores = test_time.check_tta("d4", labels, right, worse, "noisy validation")
    assert tta == "none" and scores["d4"] < scores["none"] == 1.0 and scores["lower_share"] == 1.0
    assert why == (f"noisy validation macro-F1 {scores['d4']:.4f} with d4, 1.0000 without, lower in 100% of "
                   f"{test_time.RESAMPLES} resamples of the images: d4 dropped")
    slightly = one_hot(labels, right=np.arange(60) != 7)  # one image of 60: within chance, the views are kept
    tta, why, scores = test_time.check_tta("d4", labels, right, slightly)
    assert tta == "d4" and scores["d4"] < 1.0 and 0 < scores["lower_share"] < test_time.BEYOND_CHANCE
    assert why.endswith("kept, within chance")
    tta, why, scores = test_time.check_tta("d4", labels, worse, right)  # higher: kept, nothing resampled
    assert tta == "d4" and why.endswith("without: kept") and "lower_share" not in scores
    assert test_time.check_tta("rot4", labels, right, right)[0] == "rot4"  # not lower: kept


def test_the_batchnorm_check_keeps_adapt_only_where_it_raises_macro_f1():
    labels = np.array([0, 1, 2, 0, 1, 2])
    right, worse = one_hot(labels), one_hot(labels, right=np.array([1, 1, 1, 0, 0, 1], bool))
    bn, why, scores = test_time.check_test_bn(labels, worse, right, "noisy validation")
    assert bn == "adapt" and scores == {"none": scores["none"], "adapt": 1.0} and scores["none"] < 1.0
    assert why == (f"noisy validation macro-F1 1.0000 with BatchNorm statistics from the test images, "
                   f"{scores['none']:.4f} as trained: adapt kept")
    assert test_time.check_test_bn(labels, right, worse)[0] == "none"
    assert test_time.check_test_bn(labels, right, right)[0] == "none"  # a tie: the model as trained


@pytest.mark.parametrize("adapt_helps", [True, False])
def test_auto_decides_from_the_shift_and_the_model_and_given_values_win(adapt_helps):
    labels = np.arange(30) % 3
    asked = []

    def val_probs(tta, test_bn="none"):
        asked.append((tta, test_bn))
        if tta == "none":  # BatchNorm from the test images: all right, or 10 wrong, against 5 wrong as trained
            return one_hot(labels, right=np.arange(30) < (30 if adapt_helps else 20)) if test_bn == "adapt" else \
                one_hot(labels, right=np.arange(30) < 25)
        return one_hot(labels, right=np.arange(30) < 10)  # the views: 20 wrong, lower beyond chance
    shifted = shift_of(**NOISE_AND_TURNS)["settings"]
    d = test_time.decide("auto", "auto", shifted, 20, "resnet18", val_probs, labels)
    bn = "adapt" if adapt_helps else "none"
    # BatchNorm checked first, without views; rot4 then checked, and dropped, with the statistics kept
    assert (d["tta"], d["test_bn"]) == ("none", bn)
    assert asked == [("none", "none"), ("none", "adapt"), ("none", bn), ("rot4", bn)]
    assert d["why"]["test_bn"].startswith("the test set is shifted: turn, noise; resnet18 has 20 BatchNorm layers; ")
    assert d["why"]["test_bn"].endswith(f"as trained: adapt {'kept' if adapt_helps else 'dropped'}")
    assert set(d["test_bn_check"]) == {"none", "adapt"}
    assert test_time.summary(d)["test_bn_check/adapt"] == d["test_bn_check"]["adapt"]
    assert test_time.decide("auto", "auto", shifted, 0, "vit", val_probs, labels)["test_bn"] == "none"
    clean = test_time.decide("auto", "auto", shift_of()["settings"], 20, "resnet18", val_probs, labels)
    assert (clean["tta"], clean["test_bn"], clean["why"]["test_bn"]) == ("none", "none", "the test set is not shifted")
    assert test_time.decide("auto", "auto", None, 20, "resnet18", val_probs, labels)["why"]["test_bn"] == \
        "no shift measured"
    asked.clear()
    given = test_time.decide("flip", "none", shifted, 20, "resnet18", val_probs, labels)
    assert (given["tta"], given["test_bn"], asked, test_time.describe(given)) == ("flip", "none", [], [])


# ----------------------------------------------------------------------------- train.py
@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return make_competition_folder(tmp_path_factory.mktemp("test-time") / "digits", n_train=120, n_test=24)


def train_with_shift(monkeypatch, data: Path, out: Path, shift: dict | None, *extra) -> tuple[int, list, list]:
    """train.main with `shift` as the measure's answer; (exit code, every predict_probs call as (tta, phase), the
    models BatchNorm adaptation was asked for)."""
    monkeypatch.setattr(prepare, "measure_test_shift", lambda *a: shift)
    calls, adapted, real_predict, real_adapt = [], [], training.predict_probs, training.adapt_test_bn

    def spy(model, loader, device, amp_dtype=None, tta="none", phase="prediction"):
        calls.append((tta, phase))
        return real_predict(model, loader, device, amp_dtype, tta, phase)

    def adapt_spy(model, *a):
        adapted.append(model)
        return real_adapt(model, *a)
    monkeypatch.setattr(training, "predict_probs", spy)
    monkeypatch.setattr(training, "adapt_test_bn", adapt_spy)
    code = train.main(["--data", str(data), "--img_size=32", "--batch_size=32", "--workers=0", "--epochs=1",
                       "--table_rows=0", "--keep_top_k=0", "--wandb_mode=disabled", f"--out_dir={out}",
                       "--final_fit=false", "--model", TINY_MODEL, *extra])
    return code, calls, adapted


def auto_lines(out: str) -> list[str]:
    """The lines saying what --tta/--test_bn auto became."""
    return [line for line in out.splitlines() if line.split("/")[-1].startswith(("tta auto:", "test_bn auto:"))]


def summary_of(out: Path) -> dict:
    import json
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_auto_adapts_batchnorm_and_checks_the_views_on_a_shifted_test_set(digits_folder, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "run"
    code, calls, adapted = train_with_shift(monkeypatch, digits_folder, out, shift_of(**NOISE_AND_TURNS))
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    decision = read_meta(out / "best.safetensors")["test_time"]
    bn, bn_check = decision["test_bn"], decision["test_bn_check"]
    assert bn == ("adapt" if bn_check["adapt"] > bn_check["none"] else "none")
    layers = len(batchnorm_layers(build_model(TINY_MODEL, 10)))
    assert f"test_bn auto: {bn} (the test set is shifted: turn, noise; {TINY_MODEL} has {layers} BatchNorm layers; " \
           f"noisy validation macro-F1 {bn_check['adapt']:.4f} with BatchNorm statistics from " \
           f"the test images, {bn_check['none']:.4f} as trained: adapt {'kept' if bn == 'adapt' else 'dropped'})" \
        in lines
    assert len(adapted) == 1 + (bn == "adapt")  # a copy for the check; the test prediction's where it was kept
    check = decision["tta_check"]
    line = next(line for line in lines if line.startswith("tta auto: "))
    assert line.startswith(f"tta auto: {decision['tta']} (noisy validation macro-F1 {check['rot4']:.4f} with rot4, "
                           f"{check['none']:.4f} without")
    lower = check["rot4"] < check["none"]  # then dropped only where lower in most resamples of the images
    assert lower == ("lower_share" in check) and ("resamples of the images" in line) == lower
    kept = not lower or check["lower_share"] < test_time.BEYOND_CHANCE
    assert decision["tta"] == ("rot4" if kept else "none") and line.endswith("rot4 dropped)") != kept
    # the epoch validates without TTA (noisy and clean images); BatchNorm is checked as trained and adapted, then
    # the candidate views with what was kept, on the noisy images; the test set gets what was kept
    checked = [("none", "the test-time check")] * 2 + [(tta, "the test-time check") for tta in ("none", "rot4")]
    assert calls == [("none", "validation")] * 2 + checked + [(decision["tta"], "test prediction")]
    summary = summary_of(out)
    assert (summary["tta_resolved"], summary["test_bn_resolved"]) == (decision["tta"], bn)
    assert summary["tta_check/rot4"] == check["rot4"] and summary["test_bn_check/adapt"] == bn_check["adapt"]
    assert "test_time" not in read_meta(out / "last.safetensors")  # best.safetensors alone was rewritten


@pytest.mark.slow
@pytest.mark.parametrize("shift,model,bn_line", [
    (shift_of(), TINY_MODEL, "test_bn auto: none (the test set is not shifted)"),
    (None, TINY_MODEL, "test_bn auto: none (no shift measured)"),
    (shift_of(**NOISE_AND_TURNS), "test_vit", "test_bn auto: none (test_vit has no BatchNorm layers)"),
], ids=["clean", "unmeasured", "no-batchnorm"])
def test_auto_predicts_as_trained_without_shift_or_batchnorm(digits_folder, tmp_path, monkeypatch, capsys, shift,
                                                             model, bn_line):
    out = tmp_path / "run"
    code, calls, adapted = train_with_shift(monkeypatch, digits_folder, out, shift, "--model", model)
    assert code == 0 and not adapted
    assert bn_line in capsys.readouterr().out.splitlines()
    assert summary_of(out)["test_bn_resolved"] == read_meta(out / "best.safetensors")["test_time"]["test_bn"] == "none"
    if shift is None or not shift["settings"]["turn"]["p"]:
        assert calls == [("none", "validation"), ("none", "test prediction")]  # no candidate: nothing to check


@pytest.mark.slow
def test_given_values_win_over_the_measured_shift(digits_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, calls, adapted = train_with_shift(monkeypatch, digits_folder, out, shift_of(**NOISE_AND_TURNS),
                                            "--tta=flip", "--test_bn=none")
    assert code == 0 and not adapted and not auto_lines(capsys.readouterr().out)
    assert calls == [("flip", "validation")] * 2 + [("flip", "test prediction")]  # a name validates every epoch
    decision = read_meta(out / "best.safetensors")["test_time"]
    assert (decision["tta"], decision["test_bn"], decision["asked"]) == ("flip", "none",
                                                                        {"tta": "flip", "test_bn": "none"})
    assert (summary_of(out)["tta_resolved"], summary_of(out)["test_bn_resolved"]) == ("flip", "none")


@pytest.mark.slow
def test_cross_validation_decides_per_fold_and_predict_reads_each_fold(digits_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cv"
    code, calls, adapted = train_with_shift(monkeypatch, digits_folder, out, shift_of(**NOISE_AND_TURNS),
                                            "--folds=2", "--cv=True")
    decisions = [read_meta(out / f"fold{k}" / "best.safetensors")["test_time"] for k in (0, 1)]
    assert code == 0 and len(adapted) == 2 + sum(d["test_bn"] == "adapt" for d in decisions)
    printed = capsys.readouterr().out
    assert all(f"fold{k}/test_bn auto: {d['test_bn']} (the test set is shifted" in printed and f"fold{k}/tta auto: "
               in printed for k, d in enumerate(decisions))
    summary = summary_of(out)
    assert [summary[f"fold{k}/tta_resolved"] for k in (0, 1)] == [d["tta"] for d in decisions]
    ttas = [d["tta"] for d in decisions]
    assert summary["tta_resolved"] == (ttas[0] if len(set(ttas)) == 1 else f"fold0 {ttas[0]}, fold1 {ttas[1]}")
    bns = [d["test_bn"] for d in decisions]
    assert summary["test_bn_resolved"] == (bns[0] if len(set(bns)) == 1 else f"fold0 {bns[0]}, fold1 {bns[1]}")

    for k, tta in enumerate(["rot4", "none"]):  # folds that disagree: predict.py says what each one gets
        update_meta(out / f"fold{k}" / "best.safetensors", {"test_time": {**decisions[k], "tta": tta}})
    assert predict.main([str(out), "--data", str(digits_folder), "--out", str(tmp_path / "s.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "tta auto: fold0 rot4, fold1 none for cv (recorded at training)" in lines
    assert any(line.startswith(("test_bn auto: fold0", f"test_bn auto: {bns[0]} for cv (recorded at training"))
               for line in lines)
    for k in (0, 1):  # folds that agree, each for its own validation scores: one value
        update_meta(out / f"fold{k}" / "best.safetensors",
                    {"test_time": {**decisions[k], "tta": "rot4", "why": {**decisions[k]["why"], "tta": f"fold {k}"}}})
    assert predict.main([str(out), "--data", str(digits_folder), "--out", str(tmp_path / "s.csv")]) == 0
    assert "tta auto: rot4 for cv (recorded at training, in each of its 2 folds)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- predict.py and the prediction cache
def checkpoint_with(path: Path, shift: dict | None, decision: dict | None) -> Path:
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, num_classes=3)
    meta = {"format": "sweepcls/1", "model": TINY_MODEL, "classes": ["a", "b", "c"], "targets": [0, 1, 2],
            "img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "config": {"monitor": "val/f1_macro"},
            "test_shift": shift, **({"test_time": decision} if decision else {})}
    atomic_write_bytes(path, checkpoint_bytes(model, meta))
    return path


def test_predict_uses_the_recorded_decision_and_given_values_win(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        cv2.imwrite(str(folder / f"img{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    recorded = {"tta": "flip", "test_bn": "adapt", "asked": {"tta": "auto", "test_bn": "auto"},
                "why": {"tta": "noisy validation macro-F1 0.9 with flip, 0.8 without: kept", "test_bn": "shifted"},
                "tta_check": {"none": 0.8, "flip": 0.9}}
    decided = checkpoint_with(tmp_path / "decided.safetensors", shift_of(**NOISE_AND_TURNS), recorded)
    older = checkpoint_with(tmp_path / "older.safetensors", shift_of(**NOISE_AND_TURNS), None)
    cache = tmp_path / "cache"

    def probs(checkpoint, *flags, main=predict.main) -> np.ndarray:
        out = tmp_path / "probs.csv"
        members = [str(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint])]
        assert main([*members, "--data", str(folder), "--out", str(tmp_path / "s.csv"),
                     "--save_probs", str(out), "--cache_dir", str(cache), *flags]) == 0
        return np.array([[float(r[f"p_{c}"]) for c in "abc"] for r in csv.DictReader(open(out))])

    auto = probs(decided)
    lines = capsys.readouterr().out.splitlines()
    assert "tta auto: flip for decided.safetensors (recorded at training: noisy validation macro-F1 0.9 with flip, " \
           "0.8 without: kept)" in lines
    assert "test_bn auto: adapt for decided.safetensors (recorded at training: shifted)" in lines
    assert np.array_equal(probs(decided, "--tta", "flip", "--test_bn", "adapt"), auto)
    assert len(list((cache / "preds").glob("*.npy"))) == 1  # the cache key holds what auto became, not "auto"
    assert not np.allclose(probs(decided, "--tta", "none", "--test_bn", "none"), auto)  # given values win
    assert not auto_lines(capsys.readouterr().out)

    fallback = probs(older)  # no decision recorded: the measured turns give rot4, the shift and BatchNorm adapt
    lines = capsys.readouterr().out.splitlines()
    assert ("tta auto: rot4 for older.safetensors (none recorded, so from its measured shift without the "
            "validation check: turns measured in the test set)") in lines
    assert any(line.startswith("test_bn auto: adapt for older.safetensors (none recorded") for line in lines)
    assert np.array_equal(probs(older, "--tta", "rot4", "--test_bn", "adapt"), fallback)

    cached = len(list((cache / "preds").glob("*.npy")))  # an ensemble of both: each member with its own decision
    both = probs([decided, older], "--wandb_mode", "disabled", "--out_dir", str(tmp_path / "ens"), main=ensemble.main)
    assert np.allclose(both, (auto + fallback) / 2, atol=1e-6) and len(list((cache / "preds").glob("*.npy"))) == cached
    assert len(auto_lines(capsys.readouterr().out)) == 4  # tta and test_bn, for each member


# ----------------------------------------------------------------------------- the model artifact
class ArtifactLog:
    """The one Run method ModelLog uses: each logged file's metadata and aliases."""
    def __init__(self):
        self.logged = []

    def log_artifact(self, path, name, type, metadata=None, aliases=()):
        self.logged.append((metadata, list(aliases)))


@pytest.mark.parametrize("policy", ["best", "all"])
def test_a_best_checkpoint_rewritten_with_its_decision_is_logged_again(tmp_path, policy):
    keeper = CheckpointKeeper(tmp_path, keep_top_k=0, maximize=True)
    s, run = SimpleNamespace(keeper=keeper, artifact_name="model-x"), ArtifactLog()
    log = training.ModelLog(policy, online=True)
    model = torch.nn.Linear(2, 2)
    for epoch, score in [(1, 0.9), (2, 0.5)]:  # epoch 1 is the best, uploaded at once (no upload before it)
        keeper.update(model, {"epoch": epoch}, epoch, score)
        log.after_epoch(run, s, epoch)
    before = len(run.logged)
    update_meta(keeper.best_path, {"test_time": {"tta": "d4"}})
    log.best_rewritten(s)
    log.log_pending(run, s)
    log.log_pending(run, s)  # logged already: no second copy
    meta, aliases = run.logged[-1]
    assert len(run.logged) == before + 1 and meta["test_time"] == {"tta": "d4"} and meta["epoch"] == 1
    assert aliases == (["best", "epoch-1"] if policy == "all" else ["best", "latest", "epoch-1"])  # all: epoch 2's
    assert read_meta(tmp_path / "last.safetensors") == {"epoch": 2}
