"""Where a run's score came from: the data it read, the code it ran, and what it changed.

Usage (train.py):
    source, artifact = data_source(cfg.data, run, cache_dir)    # --data wandb:E/P/NAME:ALIAS -> a local folder
    rows = manifest(data)                                          # one (split, id, bytes, label) per image
    meta = record(cfg, run, out_dir, rows, data.classes, ...)      # run.json, W&B config; returns checkpoint metadata

A run folder then holds run.json (config, changed keys, parent, notes, tags, code state, data
fingerprint), data_manifest.csv (the images it trained on, with sizes and labels) and, when the
code had uncommitted changes, code.diff. journal.py reads them back; so does a resumed run,
which warns when the data changed under it.
"""
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from models.checkpoint import read_meta
from utils import UserError, tracking
from utils.files import atomic_write_bytes
from utils.runs import find_run_folder, runs_dir
from workflows.config import BOOKKEEPING_KEYS, DATA_KEYS, Config

ROOT = Path(__file__).resolve().parents[1]  # the sweepcls checkout whose code state a run records
RUN_FILE, MANIFEST_FILE, DIFF_FILE = "run.json", "data_manifest.csv", "code.diff"
MARKER_FILE = ".sweepcls-dataset.json"  # written into a data folder by `python register.py`
# new files that count as a code change (not .json: data)
CODE_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".cfg", ".sh", ".ipynb"}
MAX_META_DIFF = 64_000  # characters of the diff kept in checkpoint metadata; the whole diff is in code.diff


# ----------------------------------------------------------------------------- data
def _bytes(item) -> int:
    if isinstance(item, np.ndarray):
        return int(item.nbytes)
    try:
        return os.stat(item).st_size
    except OSError:
        return -1  # missing: dropped by --skip_bad_images, else an error before training


def manifest(data) -> list[tuple[str, str, int, str]]:
    """(split, id, bytes, label) of every training and test image, in the order read (the order the split
    depends on). Unlabelled test images have label ''."""
    rows = [("train", str(i), _bytes(item), data.classes[y]) for i, item, y in zip(data.ids, data.items, data.labels)]
    test_labels = data.test_labels if data.test_labels is not None else [None] * len(data.test_items or [])
    rows += [("test", str(i), _bytes(item), "" if y is None else data.classes[y])
             for i, item, y in zip(data.test_ids or [], data.test_items or [], test_labels)]
    return rows


def _sha(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()[:16]


def fingerprint(rows: list[tuple], classes: list[str]) -> dict:
    """Digests of the file list with sizes, of the labels, and of both with the class list (`digest`)."""
    files = _sha(f"{s}\t{i}\t{b}" for s, i, b, _ in rows)
    labels = _sha(f"{s}\t{i}\t{y}" for s, i, _, y in rows)
    train = [r for r in rows if r[0] == "train"]
    return {"digest": _sha([files, labels, *classes]), "files": files, "labels": labels, "classes": len(classes),
            "train_images": len(train), "test_images": len(rows) - len(train),
            "bytes": sum(max(r[2], 0) for r in rows)}


def write_manifest(path: Path, rows: list[tuple]) -> None:
    from datasets import write_csv
    write_csv(path, ["split", "id", "bytes", "label"], rows)


def read_manifest(path: Path) -> list[tuple] | None:
    try:
        with open(path, newline="") as fh:
            return [(r["split"], r["id"], int(r["bytes"]), r["label"]) for r in csv.DictReader(fh)]
    except (OSError, KeyError, ValueError):
        return None


def describe_changes(old: list[tuple], new: list[tuple]) -> str:
    """What differs between two manifests, with an example of each kind; '' when nothing does."""
    before, after = {(s, i): (b, y) for s, i, b, y in old}, {(s, i): (b, y) for s, i, b, y in new}
    relabelled = [k for k in after if k in before and after[k][1] != before[k][1]]
    resized = [k for k in after if k in before and after[k][0] != before[k][0]]
    added, removed = [k for k in after if k not in before], [k for k in before if k not in after]
    parts = []
    if relabelled:
        k = relabelled[0]
        parts.append(f"{len(relabelled)} label(s) changed (e.g. {k[0]}/{k[1]}: {before[k][1]} -> {after[k][1]})")
    for what, keys in (("file(s) changed size", resized), ("image(s) added", added), ("image(s) gone", removed)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {keys[0][0]}/{keys[0][1]})")
    if not parts and [k[:2] for k in old] != [k[:2] for k in new]:
        parts.append("the same images in another order (the validation split depends on it)")
    return "; ".join(parts)


def data_source(source: str, run, cache_dir: str = "") -> tuple[str, str | None]:
    """(folder or 'digits' to load, the W&B dataset artifact it came from). --data wandb:ENTITY/PROJECT/NAME:ALIAS
    is downloaded (once per version, into the cache dir) and used by the run: lineage dataset -> run."""
    if not source.startswith("wandb:"):
        return source, None
    ref = source[len("wandb:"):]
    if not re.fullmatch(r"([\w.-]+/){0,2}[\w.-]+:[\w.-]+", ref):
        raise UserError(f"--data {source}: expected wandb:ENTITY/PROJECT/NAME:ALIAS, "
                        f"e.g. wandb:my-team/comp/train-images:latest")
    if run.mode != "online":
        raise UserError(f"--data {source} needs W&B online (an API key and a server) to download the artifact; on a "
                        f"machine that has both run `wandb artifact get {ref} --root DIR`, copy DIR here and pass "
                        f"--data DIR")
    from datasets.cache import default_cache_dir
    root = Path(cache_dir or default_cache_dir()) / "datasets" / re.sub(r"[^\w.-]", "_", ref)
    return str(run.use_artifact(ref, download_to=root)), ref


def link_registered(run, source: str, digest: str) -> str | None:
    """The dataset artifact `python register.py` made of this folder, if the data still has its
    fingerprint; online the run uses it (the lineage edge dataset -> run), offline it is recorded only."""
    try:
        marker = json.loads((Path(source) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("digest") != digest:
        print(f"note: {source} changed since it was registered as dataset {marker.get('name')}; register it again "
              f"(python register.py) to link this data to its runs")
        return None
    artifact = "/".join(filter(None, [marker.get("entity"), marker["project"], f"{marker['name']}:fp-{digest}"]))
    try:
        run.use_artifact(artifact)
    except UserError as e:  # registered offline and never synced, say: train anyway
        print(f"note: not linked to the registered dataset ({e}); `wandb sync` its register run to link later runs")
    return artifact


# ----------------------------------------------------------------------------- code
def _git(root: Path, *args) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def code_state(root: Path = ROOT) -> dict:
    """The commit of the sweepcls checkout, its branch, whether it has uncommitted changes (tracked files
    changed, or new code files git does not ignore), the diff of the tracked ones, and the new files' names.
    Not a git checkout (or no git): commit None."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "branch": None, "dirty": None, "diff": "", "untracked": []}
    diff = _git(root, "diff", "HEAD", "--no-color") or ""
    untracked = [f for f in (_git(root, "ls-files", "--others", "--exclude-standard") or "").splitlines()
                 if Path(f).suffix in CODE_SUFFIXES]  # a data folder inside the checkout is no code change
    return {"commit": commit.strip(), "branch": (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip(),
            "dirty": bool(diff or untracked), "diff": diff, "untracked": untracked}


# ----------------------------------------------------------------------------- what changed
def changes(config: dict, base: dict) -> dict:
    """The keys whose values differ from `base`, in the config's order; bookkeeping and data-location keys
    (BOOKKEEPING_KEYS, DATA_KEYS) are no change."""
    return {k: v for k, v in config.items() if k in base and k not in BOOKKEEPING_KEYS | DATA_KEYS and v != base[k]}


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "''" if value == "" else str(value)


def compact(changed: dict) -> str:
    """'lr=0.01 model=resnet18': one groupable string; '' for a run with the defaults."""
    return " ".join(f"{k}={_text(v)}" for k, v in changed.items())


def defaults() -> dict:
    return Config().to_dict()


def find_parent(ref: str, near: Path) -> dict:
    """{"id", "config", "dir"} of --parent: a run folder, a run id in the folder beside this run's (a sweep's
    runs/), in $SWEEPCLS_RUNS_DIR or in runs/, or ENTITY/PROJECT/RUN_ID from the W&B API (online)."""
    path = Path(ref)
    roots = dict.fromkeys([Path(near).parent, runs_dir(), Path("runs")])
    folders = [path] if path.is_dir() else [f for root in roots if (f := find_run_folder(root, ref))]
    for folder in folders:
        if (folder / RUN_FILE).is_file():
            rec = json.loads((folder / RUN_FILE).read_text())
            return {"id": rec["run_id"], "config": rec["config"], "dir": str(folder)}
        for ckpt in (folder / "best.safetensors", *sorted(folder.glob("fold*/best.safetensors"))):
            if ckpt.is_file():  # a run from before run.json
                meta = read_meta(ckpt)
                return {"id": meta.get("run_id", folder.name), "config": meta["config"], "dir": str(folder)}
    if re.fullmatch(r"[\w.-]+/[\w.-]+/[\w.-]+", ref) and not path.exists():
        try:
            r = tracking.api.wandb_api().run(ref)
        except Exception as e:  # noqa: BLE001 - wandb raises CommError, ValueError, UsageError...
            raise UserError(f"--parent {ref}: cannot read that W&B run ({e})") from None
        return {"id": r.id, "config": {k: v for k, v in dict(r.config).items() if not k.startswith("_")}, "dir": None}
    raise UserError(f"--parent {ref}: no run there; pass a run folder, a run id in {' or '.join(map(str, roots))}, or "
                    f"ENTITY/PROJECT/RUN_ID (online)")


# ----------------------------------------------------------------------------- the record
def record(cfg: Config, run, out_dir: Path, rows: list[tuple], classes: list[str], source_rows: list[tuple],
           artifact: str | None, resumed: bool) -> dict:
    """Write run.json, data_manifest.csv and code.diff, add the lineage to the W&B config, link a registered
    dataset (online), and warn when a resumed run's data changed. rows: what trains (after --label_fixes and
    skipped images); source_rows: the folder as read. Returns the lineage for checkpoint metadata."""
    out_dir = Path(out_dir)
    split = {k: getattr(cfg, k) for k in ("seed", "val_fraction", "folds", "group_col")}
    fp = fingerprint(rows, classes) | {"source_digest": fingerprint(source_rows, classes)["digest"], "source": cfg.data,
                                       "split": split}
    old_rows = read_manifest(out_dir / MANIFEST_FILE) if resumed else None
    changed_data = describe_changes(old_rows, rows) if old_rows is not None else ""
    if changed_data:
        print(f"warning: the data changed since this run started: {changed_data}. The epochs before the resume "
              f"trained on the old data; start a new run (--resume '') to train on this data alone",
              file=sys.stderr, flush=True)
        run.set_summary({"data_changed_on_resume": changed_data})
    if artifact is None and not cfg.data.startswith("wandb:"):
        artifact = link_registered(run, cfg.data, fp["source_digest"])
    fp["artifact"] = artifact

    changed = changes(cfg.to_dict(), defaults())
    parent = find_parent(cfg.parent, out_dir) if cfg.parent else None
    vs_parent = changes(cfg.to_dict(), {**defaults(), **Config.from_dict(
        {k: v for k, v in parent["config"].items() if k in defaults()}).to_dict()}) if parent else None
    code = code_state()
    if code["dirty"]:
        untracked = "".join(f"# untracked: {f}\n" for f in code["untracked"])
        atomic_write_bytes(out_dir / DIFF_FILE, (code["diff"] + untracked).encode())
    else:
        (out_dir / DIFF_FILE).unlink(missing_ok=True)  # a resumed run's, from before a commit
    write_manifest(out_dir / MANIFEST_FILE, rows)
    run.save_file(out_dir / MANIFEST_FILE)  # the file list, sizes and labels, in the W&B run's files
    try:
        created = json.loads((out_dir / RUN_FILE).read_text())["created"] if resumed else time.time()
    except (OSError, ValueError, KeyError):
        created = time.time()
    summary_code = {k: code[k] for k in ("commit", "branch", "dirty")}
    rec = {"run_id": run.id, "created": created, "config": cfg.to_dict(), "changed": compact(changed),
           "changed_keys": list(changed),
           "parent": parent and {"ref": cfg.parent, "id": parent["id"], "dir": parent["dir"]},
           "changed_vs_parent": compact(vs_parent) if parent else None, "notes": cfg.notes,
           "tags": tracking.split_tags(cfg.tags), "code": summary_code | {"untracked": code["untracked"]}, "data": fp}
    atomic_write_bytes(out_dir / RUN_FILE, json.dumps(rec, indent=1).encode())
    run.update_config({"changed": rec["changed"], "changed_keys": rec["changed_keys"], "code": summary_code,
                                 "data_fingerprint": fp, **({"parent_run": parent["id"], "changed_vs_parent":
                                                             rec["changed_vs_parent"]} if parent else {})})
    print(f"data {fp['digest']} ({fp['train_images']} train, {fp['test_images']} test images)"
          + (f" = dataset artifact {artifact}" if artifact else "")
          + f" | code {str(code['commit'])[:10]}{' +uncommitted changes (code.diff)' if code['dirty'] else ''}"
          + f" | changed: {rec['changed'] or 'nothing (the defaults)'}"
          + (f" | vs parent {parent['id']}: {rec['changed_vs_parent'] or 'nothing'}" if parent else ""))
    diff = code["diff"]
    return {"code": summary_code | {"untracked": code["untracked"], "diff": diff[:MAX_META_DIFF],
                                    "diff_truncated": len(diff) > MAX_META_DIFF,
                                    "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()},
            "data": fp, "changed": rec["changed"], "parent": parent and parent["id"]}
