"""The experiment journal's back office (journal.py prints it): one Entry per run, read from run folders, an
offline sweep folder or a W&B project; each run's reference (its parent or its baseline); the markdown table.

Usage: entries = runs_folder(Path("runs")); text = markdown(entries, "runs")
"""
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from utils import UserError, tracking
from utils.runs import read_local
from workflows.config import maximizes
from workflows.lineage import RUN_FILE, changes, compact, defaults


@dataclass
class Entry:
    id: str
    created: float
    state: str
    changed: dict
    metric_key: str
    metric: float | None
    maximize: bool = True
    parent: str | None = None
    parent_dir: str | None = None
    notes: str = ""
    tags: list = field(default_factory=list)
    checkpoint: str = ""
    data: str = ""
    code: str = ""


def _maximize(config: dict, key: str) -> bool:
    """The run's monitor_mode holds for its monitored key; any other key goes by its name."""
    return maximizes(key, config.get("monitor_mode", "auto") if key == config.get("monitor") else "auto")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _code(code: dict) -> str:
    commit = (code or {}).get("commit")
    return f"{commit[:8]}{'+dirty' if code.get('dirty') else ''}" if commit else ""


def _state(summary: dict) -> str:
    """running, finished, failed or stopped; a trial W&B stopped (hyperband, the UI) exits 0 but is "stopped"."""
    code = summary.get("_exit_code")
    if code == 0 and "stopped" in summary:
        return "stopped"
    return {None: "running", 0: "finished", 1: "failed"}.get(code, "stopped")


def local_entry(folder: Path, metric_key: str = "", maximize: bool | None = None, state: str = "") -> Entry | None:
    """A train.py run folder (run.json + summary.json); None for a folder that is not one."""
    folder = Path(folder)
    try:
        rec = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    _, summary = read_local(folder)
    config = rec["config"]
    key = metric_key or config.get("monitor", "val/f1_macro")
    checkpoints = sorted(folder.glob("best.safetensors")) or sorted(folder.glob("fold*/best.safetensors"))
    return Entry(
        id=rec["run_id"], created=rec["created"], state=state or _state(summary),
        changed={k: config[k] for k in rec.get("changed_keys", []) if k in config}, metric_key=key,
        metric=_number(summary.get(key)), maximize=_maximize(config, key) if maximize is None else maximize,
        parent=(rec.get("parent") or {}).get("id"), parent_dir=(rec.get("parent") or {}).get("dir"),
        notes=rec.get("notes") or "", tags=rec.get("tags") or [],
        checkpoint=(str(checkpoints[0]) if len(checkpoints) == 1 else str(folder / "fold*/best.safetensors")
                    if checkpoints else ""),
        data=(rec.get("data") or {}).get("digest", "")[:8], code=_code(rec.get("code")))


def runs_folder(root: Path) -> list[Entry]:
    """The train.py runs among root's subfolders (eda, register and ensemble runs have no run.json)."""
    if not Path(root).is_dir():
        return []
    entries = (local_entry(d) for d in sorted(Path(root).iterdir()) if d.is_dir())
    return [e for e in entries if e is not None]


def sweep_folder(root: Path) -> tuple[list[Entry], str]:
    """An offline sweep's trials (sweep.py's folder), scored by the sweep's metric; a trial that never got
    as far as writing run.json is listed from its parameters."""
    from workflows.sweep import SweepDir
    sdir = SweepDir(Path(root))
    info = sdir.info()
    metric = (info["sweep"].get("metric") or {})
    key, maximize = metric.get("name", ""), metric.get("goal", "minimize") == "maximize"
    entries = []
    for t in sdir.trials():
        e = local_entry(sdir.out_dir(t), key, maximize, t.state)
        if e is None:
            e = Entry(id=t.id, created=t.started or 0.0, state=t.state, changed=changes(t.params, defaults()),
                      metric_key=key, metric=None, maximize=maximize)
        entries.append(e)
    return entries, f"sweep {info['name']} ({info['id']}), {Path(root)}"


def _utc(iso: str) -> float:
    """W&B's created_at (ISO 8601, UTC, with or without a zone) as a Unix time."""
    when = datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def project_runs(project: str, entity: str = "") -> list[Entry]:
    """The train.py runs of a W&B project, from the public API (needs a key and a server)."""
    try:
        runs = list(tracking.api.wandb_api().runs(f"{entity}/{project}" if entity else project, order="+created_at",
                                                  per_page=tracking.api.RUNS_PAGE, lazy=False))  # config, summary in
        # each page: one request per RUNS_PAGE runs, not one per run
    except Exception as e:  # noqa: BLE001 - wandb raises CommError, ValueError, UsageError...
        raise UserError(f"cannot read W&B project {entity + '/' if entity else ''}{project}: {e}") from None
    entries = []
    for r in runs:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        if "monitor" not in config:  # eda, register and ensemble runs
            continue
        key = config["monitor"]
        keys = config.get("changed_keys")
        changed = {k: config[k] for k in keys if k in config} if keys is not None else changes(config, defaults())
        cv = "" if not config.get("cv") else "-fold0"
        entries.append(Entry(
            id=r.id, created=_utc(r.created_at), state=r.state,
            changed=changed, metric_key=key, metric=_number(r.summary.get(key)), maximize=_maximize(config, key),
            parent=config.get("parent_run"), notes=r.notes or "", tags=list(r.tags or []),
            checkpoint=f"{r.entity}/{r.project}/model-{r.id}{cv}:best" if r.summary.get("best_epoch") or cv else "",
            data=(config.get("data_fingerprint") or {}).get("digest", "")[:8], code=_code(config.get("code"))))
    return entries


# ----------------------------------------------------------------------------- the table
def _items(changed: dict) -> set:
    return {(k, json.dumps(v, sort_keys=True)) for k, v in changed.items()}


def reference(entry: Entry, entries: list[Entry]) -> tuple[Entry | None, str]:
    """(the run entry is scored against, 'parent' or 'baseline'); (None, '') when there is none."""
    by_id = {e.id: e for e in entries}
    if entry.parent:
        parent = by_id.get(entry.parent) or (local_entry(Path(entry.parent_dir), entry.metric_key, entry.maximize)
                                             if entry.parent_dir else None)
        return parent, "parent" if parent is not None else ""
    own = _items(entry.changed)
    below = [e for e in entries if e is not entry and e.metric_key == entry.metric_key and _items(e.changed) < own]
    if not below:
        return None, ""
    return min(below, key=lambda e: (-len(e.changed), e.created)), "baseline"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(entries: list[Entry], title: str) -> str:
    entries = sorted(entries, key=lambda e: e.created)
    common = set.intersection(*(_items(e.changed) for e in entries)) if len(entries) > 1 else set()
    keys = sorted({e.metric_key for e in entries})
    scored = [e for e in entries if e.metric is not None]
    best = {k: (max if all(e.maximize for e in scored if e.metric_key == k) else min)(
        (e.metric for e in scored if e.metric_key == k), default=None) for k in keys}
    lines = [f"# Journal: {title}", "",
             f"{len(entries)} run(s), oldest first; written {time.strftime('%Y-%m-%d %H:%M')}."]
    if common:  # in config order
        shared = {k: v for k, v in entries[0].changed.items() if (k, json.dumps(v, sort_keys=True)) in common}
        lines.append(f"Every run changes: `{compact(shared)}`.")
    metric_head = f"{keys[0]} {'↑' if scored and scored[0].maximize else '↓'}" if len(keys) == 1 else "metric"
    lines += ["", f"| # | date | run | state | changed | {metric_head} | Δ | notes | data | code | checkpoint |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, e in enumerate(entries, 1):
        own = {k: v for k, v in e.changed.items() if (k, json.dumps(v, sort_keys=True)) not in common}
        value = "" if e.metric is None else f"{e.metric:.4f}" + ("" if len(keys) == 1 else f" ({e.metric_key})")
        if e.metric is not None and e.metric == best[e.metric_key]:
            value = f"**{value}**"
        ref, why = reference(e, entries)
        delta = (f"{e.metric - ref.metric:+.4f} vs {ref.id} ({why})" if ref is not None and e.metric is not None
                 and ref.metric is not None else f"vs {ref.id} ({why}): no score" if ref is not None else "")
        notes = e.notes + (f" [{', '.join(e.tags)}]" if e.tags else "")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)) if e.created else ""
        lines.append("| " + " | ".join(_cell(c) for c in (
            n, when, e.id, e.state, compact(own) or ("defaults" if not e.changed else "—"), value, delta, notes,
            e.data, e.code, e.checkpoint)) + " |")
    return "\n".join(lines) + "\n"
