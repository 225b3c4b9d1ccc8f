"""The W&B boundary: the only module that imports wandb. Usage:
    run = tracking.init(cfg.to_dict(), run_id, out_dir, mode=cfg.wandb_mode, ...)
    cfg = Config.from_dict(tracking.config(run))   # values a sweep locked win
    tracking.log_eval_tables(run, "val", ...); tracking.log(run, metrics); tracking.finish(run)

Run files, staged media and artifacts all go under out_dir, so an offline run can be copied and
synced whole. Mode "auto" means online when an API key is configured, else offline.
Beside them, in any mode, the scalars go to plain files that need no W&B to read (the offline sweep
runner reads them while the run is live): out_dir/metrics.jsonl, one line per logged row, and
out_dir/summary.json, the summary so far, with "_exit_code" once the run has finished.

The plain files are written at once; every W&B call (rows, tables, images, artifacts, summary)
goes, in order, to one background thread per run, so building tables and staging checkpoints
overlaps the next epoch instead of delaying it. finish() waits for it; an error on that thread
is raised by the next call here.
"""
import json
import math
import netrc
import numbers
import os
import secrets
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np
import wandb

from utils import UserError
from utils.background import BackgroundWriter
from utils.files import atomic_write_bytes
from workflows.config import ADDED_CONFIG_KEYS

THUMB_PX = 128  # longest side of table thumbnails
METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"
_LOCAL: dict[int, dict] = {}  # id(run) -> {"dir": out_dir, "summary": {...}}, the plain-file record


def _submit(run, fn) -> None:
    writer = _LOCAL.get(id(run), {}).get("writer")
    writer.submit(fn) if writer is not None else fn()


def random_id() -> str:
    """8 characters of [a-z0-9], the shape of W&B's run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def new_run_id() -> str:
    """The agent's run id under `wandb agent` (it sets WANDB_RUN_ID), else a fresh one."""
    return os.environ.get("WANDB_RUN_ID") or random_id()


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        return rc.authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(requested: str) -> str:
    """--wandb_mode beats WANDB_MODE beats auto-detection. Without a key, online wandb.init would
    fail or prompt, so auto means offline then."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":  # wandb's old name for offline
        return "offline"
    return "online" if has_api_key() else "offline"


def init(config: dict, run_id: str, out_dir: Path, mode: str, project: str = "", entity: str = "",
         name: str = "", job_type: str = "train", resume: dict | None = None, console: bool = False, record: bool = True,
         notes: str = "", tags: str | list = ""):
    """resume: a resumed run's {"wandb_step", "history_rows", "summary"} from its last saved state; W&B
    continues the same run id (offline: a new offline-run-...-<id>-N folder that syncs into it).
    console: W&B also captures stdout/stderr. record False: no run files at all (torchrun's ranks > 0).
    tags: added to those in $WANDB_TAGS (the offline sweep runner's), which an explicit list would replace.
    save_code: W&B keeps the script (files/code/) and, in a git checkout, the commit, remote and diff.patch."""
    if not record:
        return wandb.init(mode="disabled", config=config, id=run_id)
    mode = resolve_mode(mode)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DATA_DIR"] = str(out_dir / "wandb-data")  # staged tables, media and artifact files
    if mode == "offline" and not name:
        name = f"{config.get('model', 'run')}-{run_id}"
    run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT") or "sweepcls", entity=entity or None,
        id=run_id, name=name or None, dir=str(out_dir), config=config, mode=mode, job_type=job_type,
        resume="allow" if resume else None, settings=wandb.Settings(console="auto" if console else "off", save_code=True),
        notes=notes or None, tags=split_tags(os.environ.get("WANDB_TAGS", ""), tags) or None)
    for key, step in [("train/*", "epoch"), ("val/*", "epoch"), ("lr", "epoch"), ("fold*", "epoch"), ("cv/*", "fold")]:
        run.define_metric(key, step_metric=step)  # fold<k>/...: a cross-validated run's folds
    rows = (out_dir / METRICS_FILE).read_text().splitlines()[:resume["history_rows"]] if resume else []
    (out_dir / METRICS_FILE).write_text("".join(r + "\n" for r in rows))  # rows after the saved state are redone
    _LOCAL[id(run)] = {"dir": out_dir, "summary": dict(resume["summary"]) if resume else {}, "rows": len(rows)}
    _write_summary(_LOCAL[id(run)])  # no stale "_exit_code" from an earlier attempt while this one runs
    if resume and mode != "disabled":
        run.log({"resumed_at_step": resume["wandb_step"]}, step=resume["wandb_step"])  # steps go on from there
    _LOCAL[id(run)] |= {"step": int(run.step) if mode != "disabled" else 0,  # W&B's next step, counted here
                        "writer": BackgroundWriter("wandb-writer") if mode != "disabled" else None,
                        "thumbs": {}}  # (table prefix, sample id) -> its wandb.Image, encoded once per run
    if mode == "offline":
        print(f"W&B is offline. Upload this run later with: wandb sync {Path(run.dir).parent}")
    return run


def split_tags(*tags) -> list[str]:
    """Comma-separated text (or lists) -> tags in order, each once."""
    found = [t.strip() for group in tags for t in (group.split(",") if isinstance(group, str) else group)]
    return list(dict.fromkeys(t for t in found if t))


def config(run) -> dict:
    """The run's config as W&B holds it, sweep-locked values included; the lineage record left out."""
    return {k: v for k, v in dict(run.config).items() if not k.startswith("_") and k not in ADDED_CONFIG_KEYS}


def update_config(run, values: dict) -> None:
    """Entries beside the Config keys (workflows/lineage.py's record), replaced on a resumed run."""
    values = dict(values)
    _submit(run, lambda: run.config.update(values, allow_val_change=True))


def use_artifact(run, ref: str, download_to: Path | None = None) -> Path | None:
    """Online: the run uses artifact `ref` (an input edge in W&B's lineage graph), downloaded into download_to
    when given; returns that folder. Offline and disabled runs cannot (W&B refuses): None."""
    if run.settings.mode != "online":
        return None
    found = []

    def use():
        try:
            artifact = run.use_artifact(ref)
            found.append(Path(artifact.download(root=str(download_to))) if download_to is not None else None)
        except Exception as e:  # noqa: BLE001 - wandb raises CommError, ValueError...
            raise UserError(f"W&B artifact {ref}: {e}") from None
    _submit(run, use)  # in order with the run's other W&B calls, and waited for
    writer = _LOCAL.get(id(run), {}).get("writer")
    if writer is not None:
        writer.drain()
    return found[0]


_SKIP = object()


def _plain(value):
    """JSON-able scalars, NaN and inf as text so every line stays valid JSON; _SKIP for media and tables."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if _SKIP not in items else _SKIP
    if isinstance(value, dict):
        items = {str(k): _plain(v) for k, v in value.items()}
        return items if _SKIP not in items.values() else _SKIP
    if isinstance(value, numbers.Number):
        value = float(value) if not isinstance(value, numbers.Integral) else int(value)
        return value if not isinstance(value, float) or math.isfinite(value) else str(value)
    return _SKIP


def _write_summary(local: dict | None) -> None:
    if local is not None:  # a reader sees the old summary or the new one
        atomic_write_bytes(local["dir"] / SUMMARY_FILE, json.dumps(local["summary"], indent=1).encode())


def log(run, metrics: dict) -> None:
    _submit(run, lambda: run.log(metrics))  # commits the row, with any media logged before it (commit=False)
    local = _LOCAL.get(id(run))
    if local is not None:
        local["step"] += local["writer"] is not None
        row = {k: _plain(v) for k, v in metrics.items()} | {"_time": round(time.time(), 3)}  # wall clock, Unix seconds
        with open(local["dir"] / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({k: v for k, v in row.items() if v is not _SKIP}) + "\n")
        local["rows"] += 1


def position(run) -> dict:
    """Where the run's record stands, for a resume state: W&B's next step, plain history rows, summary."""
    local = _LOCAL.get(id(run), {"rows": 0, "summary": {}, "step": 0})
    return {"wandb_step": local["step"], "history_rows": local["rows"], "summary": dict(local["summary"])}


def history(run, prefix: str = "") -> list[dict]:
    """The rows logged so far (resumed attempts included), keys under `prefix` with the prefix taken off."""
    local = _LOCAL.get(id(run))
    rows = read_local(local["dir"])[0] if local is not None else []
    return [{k[len(prefix):] if k != "epoch" else k: v for k, v in r.items() if k.startswith(prefix) or k == "epoch"}
            for r in rows if any(k.startswith(prefix) for k in r)]


def set_summary(run, values: dict) -> None:
    values = dict(values)

    def update():
        for k, v in values.items():
            run.summary[k] = v
    _submit(run, update)
    local = _LOCAL.get(id(run))
    if local is not None:
        plain = {k: _plain(v) for k, v in values.items()}
        local["summary"].update({k: v for k, v in plain.items() if v is not _SKIP})
        _write_summary(local)


def read_local(out_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, summary) of a run from its plain files, live or finished; empty when absent."""
    out_dir = Path(out_dir)
    try:
        lines = (out_dir / METRICS_FILE).read_text().splitlines()
    except OSError:
        lines = []
    history = []
    for line in lines:
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}
    return history, summary


def _thumb(image: np.ndarray, caption: str = ""):
    h, w = image.shape[:2]
    if max(h, w) > THUMB_PX:
        import cv2
        scale = THUMB_PX / max(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return wandb.Image(image, caption=caption)


def _prediction_table(rows: np.ndarray, ids, images, y_true, probs, classes):
    """images(r) -> the row's wandb.Image (one per sample, shared by the tables of one call)."""
    columns = ["id", "image", "true", "pred", "confidence", "correct"] + [f"p_{c}" for c in classes]
    table = wandb.Table(columns=columns)
    pred = probs.argmax(1)
    for r in rows:
        t, p = int(y_true[r]), int(pred[r])
        table.add_data(str(ids[r]), images(r), classes[t], classes[p], float(probs[r, p]), bool(t == p),
                       *map(float, probs[r]))
    return table


def log_eval_tables(run, prefix: str, ids, images, y_true, probs, classes, metrics: dict, max_rows: int) -> None:
    """Prediction table, misclassified table (most confident mistakes first), confusion matrix and
    per-class scores, added to the next history row (tracking.log). `images(i)` returns sample i as
    HxWx3 uint8; it is called on the writer thread, after this returns."""
    if run.settings.mode == "disabled":  # nothing would keep them; skip decoding and staging images
        return
    _submit(run, lambda: _log_eval_tables(run, prefix, ids, images, y_true, probs, classes, metrics, max_rows))


def _log_eval_tables(run, prefix, ids, images, y_true, probs, classes, metrics, max_rows) -> None:
    thumbs = _LOCAL.get(id(run), {}).get("thumbs", {})  # the same sample at every new best: one PNG

    def thumb(r):
        key = (prefix, str(ids[r]))
        if key not in thumbs:
            thumbs[key] = _thumb(images(r))
        return thumbs[key]
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:max_rows]
    per_class = wandb.Table(columns=["class", "precision", "recall", "f1", "auc", "support"], data=[
        [c, float(metrics["precision"][i]), float(metrics["recall"][i]), float(metrics["f1"][i]),
         None if np.isnan(metrics["auc"][i]) else float(metrics["auc"][i]), int(metrics["support"][i])]
        for i, c in enumerate(classes)])
    run.log({
        f"{prefix}/predictions": _prediction_table(np.arange(min(max_rows, len(y_true))), ids, thumb, y_true, probs, classes),
        f"{prefix}/misclassified": _prediction_table(wrong, ids, thumb, y_true, probs, classes),
        f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=y_true.tolist(), preds=pred.tolist(), class_names=list(classes)),
        f"{prefix}/per_class": per_class,
        f"{prefix}/per_class_f1": wandb.plot.bar(per_class, "class", "f1", title=f"{prefix} F1 per class"),
        f"{prefix}/confused_pairs": _confused_pairs(y_true, probs, classes, metrics["confusion"], thumb),
    }, commit=False)


def _confused_pairs(y_true, probs, classes, confusion: np.ndarray, thumb, top: int = 10, examples: int = 4):
    """The most frequent (true, predicted) mistakes, each with its most confident examples."""
    pred = probs.argmax(1)
    pairs = sorted(((int(confusion[t, p]), t, p) for t, p in zip(*np.nonzero(confusion)) if t != p),
                   key=lambda c: (-c[0], c[1], c[2]))[:top]
    table = wandb.Table(columns=["true", "predicted", "count", "share_of_true", *[f"example_{k}" for k in range(1, examples + 1)]])
    for n, t, p in pairs:
        rows = np.flatnonzero((y_true == t) & (pred == p))
        rows = rows[np.argsort(-probs[rows, p], kind="stable")][:examples]
        table.add_data(classes[t], classes[p], n, n / int(confusion[t].sum()),
                       *[thumb(r) for r in rows], *[None] * (examples - len(rows)))
    return table


def log_table(run, key: str, columns: list[str], rows: list[list]) -> None:
    """A table; HxWx3 uint8 cells become thumbnails."""
    if run.settings.mode == "disabled":
        return

    def log_it():
        table = wandb.Table(columns=columns)
        for row in rows:
            table.add_data(*[_thumb(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v for v in row])
        run.log({key: table})
    _submit(run, log_it)
    _LOCAL[id(run)]["step"] += 1


def wandb_api():
    """The W&B public API (needs a server and a key): the one seam tests replace with a fake."""
    return wandb.Api()


def download_artifact(ref: str, root: Path) -> Path:
    """Download ENTITY/PROJECT/NAME:ALIAS into root (files already there with the same digest are kept)."""
    try:
        artifact = wandb_api().artifact(ref)
    except Exception as e:  # noqa: BLE001 - wandb raises CommError, ValueError, UsageError...
        raise UserError(f"cannot fetch W&B artifact {ref}: {e}; offline, pass the run dir or checkpoint file instead") from None
    return Path(artifact.download(root=str(root)))


def top_sweep_runs(path: str, k: int) -> list[str]:
    """Ids of the k best runs of an online sweep ENTITY/PROJECT/ID, by the sweep's own metric."""
    try:
        sweep = wandb_api().sweep(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read W&B sweep {path}: {e}") from None
    metric = sweep.config.get("metric") or {}
    name, maximize = metric.get("name"), metric.get("goal", "minimize") == "maximize"
    scored = [r for r in sweep.runs if isinstance(r.summary.get(name), (int, float))]
    scored.sort(key=lambda r: r.summary[name], reverse=maximize)
    return [r.id for r in scored[:k]]


def log_artifact(run, path: Path, name: str, type: str, metadata: dict | None = None, aliases=()) -> None:
    if run.settings.mode == "disabled":  # W&B would still stage a copy of the file
        return
    path = Path(path)
    # the file as it is now, whatever replaces it before the writer thread stages it (files here are replaced by rename)
    snapshot = path.with_name(f".{path.name}.artifact-{random_id()}")
    try:
        os.link(path, snapshot)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, snapshot)

    def log_it():
        try:
            artifact = wandb.Artifact(name, type=type, metadata=metadata)
            artifact.add_file(str(snapshot), name=path.name)  # copied into W&B's staging area here
            run.log_artifact(artifact, aliases=list(aliases))
        finally:
            snapshot.unlink(missing_ok=True)
    _submit(run, log_it)


def use_file(run, path: Path, name: str, type: str, metadata: dict | None = None) -> None:
    """A local file as an artifact this run reads: online, an input of the run in W&B's lineage graph; offline
    (where W&B refuses use_artifact) logged by the run, so it still reaches W&B on sync."""
    if run.settings.mode != "online":
        log_artifact(run, path, name, type, metadata)
        return

    def use_it():
        artifact = wandb.Artifact(name, type=type, metadata=metadata)
        artifact.add_file(str(path))
        run.use_artifact(artifact)
    _submit(run, use_it)


def save_file(run, path: Path) -> None:
    """A plain file of the run folder also in the W&B run's files (offline: synced with the run)."""
    if run.settings.mode != "disabled":
        _submit(run, lambda: run.save(str(path), base_path=str(Path(path).parent), policy="now"))


def log_dataset(run, name: str, files: list[tuple[Path, str]], columns: list[str], rows: list[list], metadata: dict,
                references: bool = False, aliases=(), description: str = "") -> None:
    """A W&B artifact of type dataset: each (file, its name in the artifact) copied in, or with references a
    file:// reference with its checksum (nothing copied); and the table `samples` of `rows`, whose
    callable cells are called here (one image decoded at a time) and HxWx3 uint8 cells become thumbnails."""
    if run.settings.mode == "disabled":
        return

    def log_it():
        artifact = wandb.Artifact(name, type="dataset", description=description or None, metadata=metadata)
        for path, arcname in files:
            if references:
                artifact.add_reference(Path(path).resolve().as_uri(), name=arcname, checksum=True)
            else:
                artifact.add_file(str(path), name=arcname)
        table = wandb.Table(columns=columns)
        for row in rows:
            cells = [v() if callable(v) else v for v in row]
            table.add_data(*[_thumb(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v for v in cells])
        artifact.add(table, "samples")
        run.log_artifact(artifact, aliases=list(aliases))
    _submit(run, log_it)


def run_to_end(run, work) -> int:
    """work() inside the run, then finish it: exit code 0; 1 after a UserError (one 'error:' line on stderr,
    also in the summary); any other exception finishes the run with 1 and propagates."""
    try:
        work()
    except UserError as e:
        set_summary(run, {"error": str(e)})
        finish(run, exit_code=1)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        finish(run, exit_code=1)
        raise
    return finish(run)


def finish(run, exit_code: int = 0) -> int:
    """Wait for the writer thread's W&B calls, then finish the run; _exit_code goes in summary.json last.
    Returns the exit code: 1 instead of 0 when a W&B call on the writer thread failed (said on stderr)."""
    local = _LOCAL.pop(id(run), None)
    error = None
    if local is not None and local["writer"] is not None:
        try:
            local["writer"].close()
        except Exception as e:  # noqa: BLE001 - still finish the run and write the exit code
            error, exit_code = e, exit_code or 1
    run.finish(exit_code=exit_code)
    if local is not None:
        local["summary"]["_exit_code"] = exit_code
        _write_summary(local)
    # wandb's process-wide setup caches the environment (WANDB_SWEEP_PARAM_PATH among it) at the first
    # init; tear it down so a later run in the same process starts from the environment as it is then
    wandb.teardown()
    if error is not None:
        print(f"error: W&B could not record part of the run ({type(error).__name__}: {error}); the checkpoints, "
              f"metrics.jsonl and summary.json are complete", file=sys.stderr)
    return exit_code
