"""Ensemble members: a reference (checkpoint file, run dir, W&B artifact, sweep) to checkpoints; each
member's probabilities with its own image size, normalization and test-time steps (tta/test_bn auto: what its run
decided), cached per (member, images, resolved steps); weights by greedy forward selection with replacement
(Caruana et al. 2004).

Usage:
    members = [resolve_member(ref, cache_dir) for ref in refs]; check_compatible(members)
    probs = member_probs(members[0], items, tta="flip", cache_dir=cache_dir)
    print("\n".join(describe_steps(members[0], "auto", "auto")))   # what auto became for this member, and why
    weights = caruana([probs_a, probs_b], labels, "f1_macro")
"""
import functools
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.checkpoint import read_meta
from utils import UserError, tracking
from utils.files import atomic_write_bytes
from utils.metrics import classification_metrics, nll
from workflows import test_time
from workflows.config import maximizes

CACHE_VERSION = 1  # bump when the prediction path changes what it returns


@dataclass
class Member:
    name: str                     # how it is shown: run id, file name or artifact ref
    paths: list[Path]             # one checkpoint, or a cross-validated run's folds (their probabilities are averaged)
    meta: dict = field(repr=False)  # the first checkpoint's metadata
    oof: Path | None = None       # oof.csv of a cross-validated run
    final: Path | None = None     # a run dir's final fit (train.py --final_fit): it predicts the test set


def for_test(member: Member) -> Member:
    """The member that predicts the test set: a run's final fit (trained on every labelled image, what wrote the
    run's own submission) where it has one, else the member itself. Validation, and so the ensemble's weights, stays
    with the holdout model: the final fit trained on the validation images."""
    if member.final is None:
        return member
    return _checkpoint_member(f"{member.name} (final fit)", [member.final])


def _checkpoint_member(name: str, paths: list[Path], oof: Path | None = None) -> Member:
    try:
        return Member(name, paths, read_meta(paths[0]), oof)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a file that is not one
        raise UserError(f"{paths[0]}: not a readable sweepcls checkpoint ({e})") from None


def is_artifact_ref(ref: str) -> bool:
    """ENTITY/PROJECT/NAME[:ALIAS] that is not a local path."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+/[\w.-]+(:[\w.-]+)?", ref)) and not Path(ref).exists()


def resolve_member(ref: str, cache_dir: Path) -> Member:
    """A checkpoint file, a run dir (best.safetensors and its final fit's final/best.safetensors, or
    fold*/best.safetensors of a --cv run), or a W&B
    artifact ref ENTITY/PROJECT/model-<id>:ALIAS, downloaded into cache_dir (online only); refs joined by '+'
    (a --cv run's ENTITY/PROJECT/model-<id>-fold<k>:best) are one member, their probabilities averaged."""
    path = Path(ref)
    if path.is_file():
        return _checkpoint_member(path.parent.name if path.name == "best.safetensors" else path.name, [path])
    if path.is_dir():
        if (path / "best.safetensors").is_file():
            member = _checkpoint_member(path.name, [path / "best.safetensors"])
            final = path / "final" / "best.safetensors"
            member.final = final if final.is_file() else None
            return member
        folds = sorted(path.glob("fold*/best.safetensors"))
        if folds:
            return _checkpoint_member(path.name, folds, path / "oof.csv" if (path / "oof.csv").is_file() else None)
        raise UserError(f"{path}: no best.safetensors (nor fold*/best.safetensors) in this folder")
    if all(map(is_artifact_ref, ref.split("+"))):  # A+B+...: one member of several artifacts (a --cv run's folds)
        return _checkpoint_member(_joined_name(ref), [_artifact_checkpoint(part, cache_dir) for part in ref.split("+")])
    raise UserError(f"member {ref!r}: no such file or folder, and not a W&B artifact ref ENTITY/PROJECT/NAME:ALIAS")


def _joined_name(ref: str) -> str:
    """How a joined ref is shown: E/P/model-x-fold0:best+E/P/model-x-fold1:best -> E/P/model-x-fold0+1:best."""
    parts = [re.fullmatch(r"(.+-fold)(\d+)(:[\w.-]+)?", part) for part in ref.split("+")]
    if len(parts) > 1 and all(parts) and len({(m[1], m[3]) for m in parts}) == 1:
        return f"{parts[0][1]}{'+'.join(m[2] for m in parts)}{parts[0][3] or ''}"
    return ref


def _artifact_checkpoint(ref: str, cache_dir: Path) -> Path:
    root = Path(cache_dir) / "artifacts" / ref.replace("/", "_").replace(":", "_")
    files = sorted(tracking.download_artifact(ref, root).glob("**/*.safetensors"))
    if not files:
        raise UserError(f"W&B artifact {ref} holds no .safetensors checkpoint")
    return files[0]


def sweep_member_refs(sweep: str, top: int) -> list[str]:
    """The top runs of a sweep as member refs: an offline sweep dir's leaderboard (run dirs), or an online
    sweep ENTITY/PROJECT/ID by its own metric: its finished runs' best model artifacts (a --cv run's folds as one
    member); a run without one is skipped with a note on stderr, and the next one taken."""
    root = Path(sweep)
    if (root / "sweep.json").is_file():
        from workflows.sweep import SweepDir, leaderboard
        sdir = SweepDir(root)
        rows = [r for r in leaderboard(sdir.info()["sweep"], sdir) if r["metric"] is not None and r["checkpoint"]]
        return [str(sdir.runs_dir / r["run_id"]) for r in rows[:top]]
    if root.exists():
        raise UserError(f"--sweep {sweep}: a folder but not a sweep dir (no sweep.json)")
    entity, project, _ = sweep.split("/") if sweep.count("/") == 2 else (None, None, None)
    if entity is None:
        raise UserError(f"--sweep {sweep}: expected an offline sweep dir or ENTITY/PROJECT/SWEEP_ID")
    if top < 1:
        return []
    refs = []
    for run in tracking.sweep_runs_best_first(sweep):  # lazy: no API call past the top K
        ref, why = _sweep_run_ref(f"{entity}/{project}", run)
        if not ref:
            print(f"note: --sweep {sweep}: skipping run {run.id}: {why}", file=sys.stderr)
            continue
        refs.append(ref)
        if len(refs) == top:
            break
    if not refs:
        raise UserError(f"--sweep {sweep}: no finished run with the sweep's metric and a model artifact to ensemble")
    return refs


def _sweep_run_ref(prefix: str, run) -> tuple[str, str]:
    """(the member ref of a finished online sweep run, "") or ("", why it has none): PREFIX/model-<id>:best, or a
    --cv run's folds PREFIX/model-<id>-fold<k>:best joined by '+' (one member). A --cv run is known by its config
    (cv true, `folds` K: all K folds are needed) or by its fold artifacts."""
    fold_name = re.compile(rf"model-{re.escape(run.id)}-fold(\d+)")
    folds = {int(m[1]): name for name in run.models if (m := fold_name.fullmatch(name))}
    cv = str(run.config.get("cv")).lower() == "true"
    if not (cv or folds):
        if f"model-{run.id}" in run.models:
            return f"{prefix}/model-{run.id}:best", ""
        return "", f"no model artifact model-{run.id}:best (crashed before its first checkpoint, or deleted)"
    k = run.config.get("folds")
    wanted = range(int(k)) if cv and str(k).isdigit() and int(k) >= 2 else sorted(folds)
    missing = [f"model-{run.id}-fold{i}:best" for i in wanted if i not in folds]
    if not folds:
        return "", f"a --cv run without fold model artifacts (model-{run.id}-fold<k>:best)"
    if missing:
        return "", f"a --cv run of {len(wanted)} folds without {', '.join(missing)}"
    return "+".join(f"{prefix}/{folds[i]}:best" for i in wanted), ""


def check_compatible(members: list[Member]) -> None:
    classes = members[0].meta["classes"]
    for m in members[1:]:
        if m.meta["classes"] != classes:
            raise UserError(f"members disagree on the classes: {members[0].name} has {classes}, {m.name} has "
                            f"{m.meta['classes']}; ensemble only models trained on the same class list")


def _file_digest(path: Path) -> str:
    st = Path(path).stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a checkpoint, once per (file, size, mtime) in a process: val and test reuse it."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def items_key(items: list) -> str:
    """Identifies a list of images: paths with size and mtime, or array bytes."""
    from datasets.cache import hash_items
    h = hashlib.sha256()
    hash_items(h, items)
    return h.hexdigest()


def member_steps(member: Member, tta: str, test_bn: str) -> list[test_time.TestTime]:
    """What each of the member's checkpoints predicts with: auto resolved per checkpoint (workflows/test_time.py: the
    decision its run recorded, else its measured shift), a given value as it is."""
    return [test_time.resolve(member.meta if i == 0 else read_meta(p), p, tta, test_bn)
            for i, p in enumerate(member.paths)]


def describe_steps(member: Member, tta: str, test_bn: str) -> list[str]:
    """The console lines saying what auto became for this member (none when both were given)."""
    return test_time.describe_resolved(member.name, member.paths, member_steps(member, tta, test_bn))


def member_probs(member: Member, items: list, tta: str, cache_dir: Path | None, batch_size: int = 64,
                 device: str = "auto", test_bn: str = "none") -> np.ndarray:
    """Class probabilities of `items`, each fold checkpoint with its own preprocessing and test-time steps (tta and
    test_bn auto: as member_steps resolves them), folds averaged; read from the cache when this member has already
    predicted these images with these steps. test_bn adapt: BatchNorm statistics re-estimated on `items` first
    (models.adapt_batchnorm)."""
    steps = member_steps(member, tta, test_bn)
    resolved = [[st.tta] + ([st.test_bn] if st.test_bn != "none" else []) for st in steps]  # never the word auto
    key = hashlib.sha256(json.dumps([CACHE_VERSION, [_file_digest(p) for p in member.paths], items_key(items),
                                     resolved]).encode()).hexdigest()[:24]
    cached = Path(cache_dir) / "preds" / f"{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        return np.load(cached)
    from datasets import ImageDataset
    from datasets.transforms import eval_transform
    from models.checkpoint import load_model
    from utils.device import make_loader, pick_device
    from workflows.inference import predict_probs
    dev = pick_device(device)
    probs = []
    for path, st in zip(member.paths, steps):
        model, meta = load_model(path, dev)
        dataset = ImageDataset(items, None, eval_transform(meta["img_size"], meta["mean"], meta["std"]))
        if st.test_bn == "adapt":  # in the batches the run trained with, as its own adaptation did: the same statistics
            from models import adapt_test_bn
            adapt_batch = int(meta.get("config", {}).get("batch_size", batch_size))
            adapt_test_bn(model, make_loader(dataset, adapt_batch, 0, dev), dev, member.name)
        probs.append(predict_probs(model, make_loader(dataset, batch_size, 0, dev), dev, None, st.tta))
    out = np.mean(probs, axis=0)
    if cached is not None:
        buffer = io.BytesIO()
        np.save(buffer, out)
        atomic_write_bytes(cached, buffer.getvalue())
    return out


def read_oof(member: Member, ids: list[str]) -> np.ndarray:
    """A cross-validated member's out-of-fold probabilities, in the order of `ids`."""
    from datasets.files import read_csv
    rows = {r["id"]: [float(r[f"p_{c}"]) for c in member.meta["classes"]] for r in read_csv(member.oof)[1]}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise UserError(f"{member.oof}: no out-of-fold row for {len(missing)} training images (e.g. {missing[0]}); "
                        f"were the members trained on different data?")
    return np.array([rows[i] for i in ids])


def score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The metric to maximize: f1_macro, acc or acsa; 'loss' is the negative log-likelihood, negated."""
    if metric == "loss":
        return -nll(probs, labels)
    return classification_metrics(labels, probs)[metric]


def caruana(probs: list[np.ndarray], labels: np.ndarray, metric: str = "f1_macro", rounds: int = 0) -> np.ndarray:
    """Non-negative weights summing to 1: add, with replacement, the member that most improves the
    average (ties broken by log-likelihood), and keep the round that scored best on `metric` (the
    earliest, smallest ensemble among equals). Round 1 picks the best single member, so the result
    never scores below it on this set."""
    def key(p):
        return score(metric, labels, p), score("loss", labels, p)
    rounds = rounds or max(20, 5 * len(probs))
    counts, total = np.zeros(len(probs)), np.zeros_like(probs[0])
    best_key, best_counts = None, None
    for r in range(1, rounds + 1):
        keys = [key((total + p) / r) for p in probs]
        i = max(range(len(probs)), key=lambda j: keys[j])  # the first of equals
        counts[i] += 1
        total = total + probs[i]
        if best_key is None or keys[i][0] > best_key:
            best_key, best_counts = keys[i][0], counts.copy()
    return best_counts / best_counts.sum()


def monitor_metric(meta: dict) -> str:
    """The member's --monitor as a score name: val/f1_macro -> f1_macro; a loss (a key to minimize) -> loss."""
    name = meta.get("config", {}).get("monitor", "val/f1_macro").split("/")[-1]
    return name if name in ("f1_macro", "acc", "acsa") else "f1_macro" if maximizes(name) else "loss"


def load_test_data(source: str, meta: dict):
    """The data a member predicts: --data as train.py reads it (its test set, and its labelled images for
    weights), or a flat folder of test images alone. Its class list must be the member's."""
    from datasets import IMAGE_EXTS, Data, load_data
    root = Path(source)
    flat = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS) if root.is_dir() else []
    if flat and not (root / "train.csv").is_file():
        return Data(classes=meta["classes"], targets=meta["targets"], items=[], labels=np.zeros(0, np.int64), ids=[],
                    test_items=flat, test_ids=[p.name for p in flat])
    cfg = meta.get("config", {})
    data = load_data(source, cfg.get("image_col", "ID"), cfg.get("label_col", "target"), cfg.get("group_col", ""))
    if data.classes != meta["classes"]:
        raise UserError(f"--data {source} has classes {data.classes}, the model was trained on {meta['classes']}")
    if not data.test_items:
        raise UserError(f"--data {source}: no test images (test/ or sample_submission.csv); nothing to predict")
    check_readable(data.test_items, "test")
    return data


def check_readable(items: list, what: str) -> None:
    """A UserError naming the first images of `items` that cannot be decoded (what: "test", "labelled", ...)."""
    from datasets import unreadable
    bad = [f"{item} ({why})" for item in items if (why := unreadable(item))]
    if bad:
        raise UserError(f"{len(bad)} {what} image(s) cannot be read, e.g. {bad[:3]}; replace them")


def file_stem(member: Member) -> str:
    """The member's name as a file or folder name: runs/abc (final fit) -> abc_final_fit, m.safetensors -> m."""
    return re.sub(r"[^\w.-]+", "_", member.name.removesuffix(".safetensors")).strip("_.") or "model"
