"""The test-time steps, --test_bn and --tta, decided from the test set's measured shift when they are auto.

train.py decides once per fit, with the best checkpoint, where it predicts the test set (workflows/training.py
predict_test): test_bn adapt when the model has BatchNorm layers, the test set was measured shifted (noise moves
BatchNorm's statistics; re-estimating them on the test images can undo that) and the statistics from the test images
raise the validation macro-F1 (a model trained on augmentation that matches the test set often loses by them: -0.04
to -0.07 on the documents benchmark); tta the views the measured
right-angle turns and mirrors make plausible (datasets/transforms.py tta_for_shift), kept unless they lower the
validation macro-F1 beyond chance (in 95 % of paired bootstrap resamples of the images; per-epoch validation
stays without TTA, so the monitor compares across epochs). The decision
is written into best.safetensors' metadata as `test_time` before the model artifact is logged from that file, so it
travels with the checkpoint: predict.py, ensemble.py and train.py's own test prediction read it back through
resolve(). A checkpoint without one (from before) is resolved from its measured shift (meta["test_shift"]) alone,
without the validation check, and the line printed says so. Under --cv each fold decides on its own validation fold.

Usage:
    decision = decide("auto", "auto", shift["settings"], bn_layers, "resnet18", val_probs, labels, "validation")
    steps = resolve(read_meta(path), path, tta="auto", test_bn="auto")   # steps.tta, steps.test_bn, steps.why
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.corruption import any_on
from datasets.transforms import tta_for_shift
from models.checkpoint import batchnorm_count, read_meta
from utils.metrics import classification_metrics

RECORDED = "recorded at training"
FALLBACK = "none recorded, so from its measured shift without the validation check"  # an older checkpoint


def shifted_ops(settings: dict | None) -> list[str]:
    """The operations the measure switched on (p > 0), in its order."""
    return [op for op, v in (settings or {}).items() if isinstance(v, dict) and v.get("p")]


def auto_test_bn(settings: dict | None, bn_layers: int, model: str) -> tuple[str, str]:
    """(adapt or none, why): adapt only a model with BatchNorm layers, and only for a test set measured shifted."""
    if not any_on(settings):
        return "none", "no shift measured" if settings is None else "the test set is not shifted"
    if not bn_layers:
        return "none", f"{model} has no BatchNorm layers"
    return "adapt", (f"the test set is shifted: {', '.join(shifted_ops(settings))}; {model} has {bn_layers} "
                     f"BatchNorm layers")


def plausible_views(settings: dict | None) -> tuple[str, str]:
    """(the TTA candidate of the measured shift, why)."""
    candidate = tta_for_shift(settings)
    what = {"d4": "turns and mirrors", "rot4": "turns", "flip": "mirrors", "none": "no turns or mirrors"}[candidate]
    return candidate, "no shift measured" if settings is None else f"{what} measured in the test set"


RESAMPLES = 200   # paired bootstrap resamples of the validation images in the TTA check
BEYOND_CHANCE = 0.95  # the views are dropped when they score lower in at least this share of the resamples


def lower_share(labels: np.ndarray, without: np.ndarray, with_views: np.ndarray) -> float:
    """The share of paired bootstrap resamples of the images (the same rows for both) where the views' macro-F1 is
    lower than without them: how sure a drop is on a few dozen validation images."""
    from sklearn.metrics import f1_score
    a, b, rng = without.argmax(1), with_views.argmax(1), np.random.default_rng(0)
    rows = (rng.integers(0, len(labels), len(labels)) for _ in range(RESAMPLES))
    f1 = lambda y, p: f1_score(y, p, average="macro", zero_division=0)  # a resample may miss a class: no warning
    return float(np.mean([f1(labels[r], b[r]) < f1(labels[r], a[r]) for r in rows]))


def check_tta(candidate: str, labels: np.ndarray, without: np.ndarray, with_views: np.ndarray,
              images: str = "validation") -> tuple[str, str, dict]:
    """(candidate, or none where it lowers macro-F1 on these images beyond chance; the reason, both scores in
    words; the scores). The measured turns and mirrors make the views plausible: a drop within chance (lower in
    fewer than BEYOND_CHANCE of the paired resamples) keeps them, as a tie does (they cost time only)."""
    plain = classification_metrics(labels, without)["f1_macro"]
    viewed = classification_metrics(labels, with_views)["f1_macro"]
    scores = {"none": plain, candidate: viewed}
    if viewed >= plain:
        return candidate, f"{images} macro-F1 {viewed:.4f} with {candidate}, {plain:.4f} without: kept", scores
    share = lower_share(labels, without, with_views)
    keep = share < BEYOND_CHANCE
    why = (f"{images} macro-F1 {viewed:.4f} with {candidate}, {plain:.4f} without, lower in {share:.0%} of "
           f"{RESAMPLES} resamples of the images: {'kept, within chance' if keep else candidate + ' dropped'}")
    return candidate if keep else "none", why, scores | {"lower_share": share}


def check_test_bn(labels: np.ndarray, as_trained: np.ndarray, adapted: np.ndarray,
                  images: str = "validation") -> tuple[str, str, dict]:
    """(adapt only where BatchNorm statistics from the test images raise macro-F1 on these images, else none; the
    reason, both scores in words; the scores). A tie keeps the model as trained."""
    plain = classification_metrics(labels, as_trained)["f1_macro"]
    moved = classification_metrics(labels, adapted)["f1_macro"]
    keep = moved > plain
    why = (f"{images} macro-F1 {moved:.4f} with BatchNorm statistics from the test images, {plain:.4f} as trained: "
           f"{'adapt kept' if keep else 'adapt dropped'}")
    return "adapt" if keep else "none", why, {"none": plain, "adapt": moved}


def decide(tta: str, test_bn: str, settings: dict | None, bn_layers: int, model: str,
           val_probs: Callable[..., np.ndarray], labels: np.ndarray, images: str = "validation") -> dict:
    """The decision train.py records in best.safetensors as meta["test_time"]: {"tta", "test_bn", "asked": what
    the flags said, "why": per key, "tta_check" and "test_bn_check": the validation scores or None}.
    val_probs(tta, test_bn): the best checkpoint's probabilities of the validation images with those views, its
    BatchNorm statistics as trained (none) or from the test images (adapt); asked only for a candidate to check.
    test_bn is checked first (without views), the views then with the BatchNorm statistics kept."""
    bn_scores = scores = None
    if test_bn == "auto":
        bn_choice, bn_why = auto_test_bn(settings, bn_layers, model)
        if bn_choice == "adapt":
            bn_choice, checked, bn_scores = check_test_bn(labels, val_probs("none", "none"),
                                                          val_probs("none", "adapt"), images)
            bn_why = f"{bn_why}; {checked}"
    else:
        bn_choice, bn_why = test_bn, f"--test_bn {test_bn} as given"
    if tta != "auto":
        tta_choice, tta_why = tta, f"--tta {tta} as given"
    else:
        tta_choice, tta_why = plausible_views(settings)
        if tta_choice != "none":
            tta_choice, tta_why, scores = check_tta(tta_choice, labels, val_probs("none", bn_choice),
                                                    val_probs(tta_choice, bn_choice), images)
    return {"tta": tta_choice, "test_bn": bn_choice, "asked": {"tta": tta, "test_bn": test_bn},
            "why": {"tta": tta_why, "test_bn": bn_why}, "tta_check": scores, "test_bn_check": bn_scores}


def describe(decision: dict, prefix: str = "") -> list[str]:
    """The console lines of a decision: one per key that was auto."""
    return [f"{prefix}{key} auto: {decision[key]} ({decision['why'][key]})"
            for key in ("test_bn", "tta") if decision["asked"][key] == "auto"]


def summary(decision: dict, prefix: str = "") -> dict:
    """The W&B summary keys of a decision (keys of their own: a sweep locks the config keys it sets)."""
    scores = {f"{prefix}{check}/{k}": v for check in ("tta_check", "test_bn_check")
              for k, v in (decision.get(check) or {}).items()}
    return {f"{prefix}tta_resolved": decision["tta"], f"{prefix}test_bn_resolved": decision["test_bn"], **scores}


def folds_summary(paths: list[Path]) -> dict:
    """tta_resolved and test_bn_resolved of a --cv run, from its folds' checkpoints: the value they agree on, else
    each fold's ('fold0 d4, fold1 none')."""
    decisions = {Path(p).parent.name: read_meta(p).get("test_time") for p in paths}
    out = {}
    for key in ("tta", "test_bn"):
        values = {fold: d[key] for fold, d in decisions.items() if d}
        if values:
            same = len(set(values.values())) == 1
            out[f"{key}_resolved"] = next(iter(values.values())) if same else ", ".join(
                f"{fold} {v}" for fold, v in values.items())
    return out


@dataclass
class TestTime:
    """What one checkpoint is predicted with; why: for each key that was auto, (where it came from, the reason)."""
    __test__ = False  # not a pytest class
    tta: str
    test_bn: str
    why: dict = field(default_factory=dict)


def resolve(meta: dict, path: str | Path, tta: str = "auto", test_bn: str = "auto") -> TestTime:
    """A given value as it is; auto: the decision recorded in the checkpoint (meta["test_time"]), else the one its
    measured shift (meta["test_shift"]) gives, without the validation check (BatchNorm layers counted from `path`)."""
    steps, recorded = TestTime(tta, test_bn), meta.get("test_time")
    settings = (meta.get("test_shift") or {}).get("settings")
    if tta == "auto":
        steps.tta, why = (recorded["tta"], recorded["why"]["tta"]) if recorded else plausible_views(settings)
        steps.why["tta"] = (RECORDED if recorded else FALLBACK, why)
    if test_bn == "auto":
        steps.test_bn, why = (recorded["test_bn"], recorded["why"]["test_bn"]) if recorded else auto_test_bn(
            settings, batchnorm_count(path), meta.get("model", "the model"))
        steps.why["test_bn"] = (RECORDED if recorded else FALLBACK, why)
    return steps


def describe_resolved(name: str, paths: list[Path], steps: list[TestTime]) -> list[str]:
    """One line per auto key of a member (predict.py, ensemble.py): what it became for it and why; a --cv run's
    folds in one line, each fold's value where they differ."""
    lines = []
    for key in ("test_bn", "tta"):
        if key not in steps[0].why:
            continue
        values = [(getattr(s, key), s.why[key]) for s in steps]
        sources = "; ".join(dict.fromkeys(source for _, (source, _) in values))
        if len(set(values)) == 1:
            value, (source, why) = values[0]
            lines.append(f"{key} auto: {value} for {name} ({source}: {why})")
        elif len({v for v, _ in values}) == 1:  # the folds agree, for reasons of their own (their validation scores)
            lines.append(f"{key} auto: {values[0][0]} for {name} ({sources}, in each of its {len(values)} folds)")
        else:
            each = ", ".join(f"{Path(p).parent.name} {v}" for p, (v, _) in zip(paths, values))
            lines.append(f"{key} auto: {each} for {name} ({sources})")
    return lines
