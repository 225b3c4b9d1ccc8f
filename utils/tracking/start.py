"""Starting a run: the mode resolved (utils/tracking/mode.py), the server probed, wandb.init with every file under
out_dir, an offline fallback for a standalone run whose server cannot be reached. Usage:
    run = init(cfg.to_dict(), run_id, out_dir, cfg.wandb_mode, RunOptions(project=cfg.project))
"""
import os
from dataclasses import dataclass
from pathlib import Path

import wandb
from wandb.errors import CommError

from utils.runs import ATTEMPT_KEYS, DEFAULT_PROJECT, RunRecord
from utils.tracking import mode as modes
from utils.tracking import private
from utils.tracking.run import Run

INIT_TIMEOUT_S = 60  # wandb.init's own limit for an online run (wandb's default: 90 s) unless WANDB_INIT_TIMEOUT


@dataclass
class RunOptions:
    """Where a run goes and how it is named, described and recorded (init)."""
    project: str = ""  # '' = $WANDB_PROJECT, else sweepcls
    entity: str = ""  # '' = the key's default entity
    name: str = ""  # '' = <model>-<run id> offline, W&B's own name online
    job_type: str = "train"
    notes: str = ""
    tags: str | list = ""  # added to those in $WANDB_TAGS (the offline sweep runner's); a list replaces them
    console: bool = True  # W&B also captures stdout/stderr
    record: bool = True  # False: no run files at all (torchrun's ranks > 0)


def init(config: dict, run_id: str, out_dir: Path, mode: str, options: RunOptions | None = None, *,
         resume: dict | None = None, stop_fn=None) -> "Run":
    """options: RunOptions (project, entity, name, job type, notes, tags, console, record).
    resume: a resumed run's {"wandb_step", "history_rows", "summary"} from its last saved state; W&B
    continues the same run id (offline: a new offline-run-...-<id>-N folder that syncs into it). Under `wandb agent`
    a run id may be one W&B requeued after a preemption: the run is always continued there, never replaced.
    stop_fn: called (on a W&B thread) when W&B asks the run to stop (the UI's stop button, a sweep's early
    termination), in place of wandb's own SIGINT to the main thread (utils/stop.py StopSignal.request).
    save_code: W&B keeps the script (files/code/) and, in a git checkout, the commit, remote and diff.patch."""
    o = options or RunOptions()
    if not o.record:
        return Run(wandb.init(mode="disabled", config=config, id=run_id), None)
    # a mode resolved already (train.py resolves it first, on every rank) is not resolved, nor probed, again
    mode = modes.resolve_mode(mode) if mode == "auto" else mode  # under `wandb agent`: a missing key or server raises
    sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    # a standalone run whose server cannot be reached goes offline at once, saying so, instead of waiting
    # for wandb.init's timeout and a traceback
    unreachable = modes._server_unreachable() if mode == "online" and not sweep else ""
    mode = "offline" if unreachable else mode
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DATA_DIR"] = str(out_dir / "wandb-data")  # staged tables, media and artifact files
    where = {"project": o.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, "entity": o.entity or None,
             "id": run_id}
    if sweep:  # under `wandb agent` the sweep decides all three (ours: ignored, warned)
        where = {}

    def start(mode):
        settings = {"console": "auto" if o.console else "off", "save_code": True,
                    **({"stop_fn": stop_fn} if stop_fn is not None else {})}
        if mode == "online" and not os.environ.get("WANDB_INIT_TIMEOUT"):  # a server that connects, then hangs
            settings["init_timeout"] = INIT_TIMEOUT_S
        return wandb.init(
            **where, name=o.name or (f"{config.get('model', 'run')}-{run_id}" if mode == "offline" else None),
            dir=str(out_dir), config=config, mode=mode, job_type=o.job_type,
            resume="allow" if resume or sweep else None, settings=wandb.Settings(**settings), notes=o.notes or None,
            tags=split_tags(os.environ.get("WANDB_TAGS", ""), o.tags) or None)
    try:
        run = start(mode)
    except (CommError, TimeoutError) as e:  # init_timeout passed (CommError), or wandb's grace period after it
        if mode != "online" or sweep:
            raise
        limit = os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]  # wandb adds lines of advice
        unreachable = f"W&B's server {private.wandb_settings().base_url} could not be reached within {limit} s ({why})"
        mode = "offline"
        wandb.teardown()  # the failed online attempt's service; the offline run starts afresh
        run = start(mode)
    for key, step in [("train/*", "epoch"), ("val/*", "epoch"), ("lr", "epoch"), ("fold*", "epoch"), ("cv/*", "fold")]:
        run.define_metric(key, step_metric=step)  # fold<k>/...: a cross-validated run's folds
    record = RunRecord(out_dir, resume)
    if (resume or sweep) and mode != "disabled":
        _continue_attempt(run, resume)
    if mode == "offline":
        # every attempt of a resumed run is a folder of its own under out_dir/wandb/: sync them all, in order
        sync = f"wandb sync {Path(run.dir).parent.parent}"
        print(f"{unreachable}, so this run is recorded offline. Upload it later with: {sync}" if unreachable
              else f"W&B is offline. Upload this run later with: {sync}")
    return Run(run, record)


def _continue_attempt(run, resume: dict | None) -> None:
    """A run W&B may already have (resumed, or a trial W&B requeued): how the last attempt ended goes from the
    summary, which W&B copied back from the server (online) or will merge this attempt's into (an offline one,
    synced); a remove record, nothing for a key the summary lacks. A resumed run's steps go on from its saved one."""
    for key in ATTEMPT_KEYS:
        del run.summary[key]
    if resume:
        run.log({"resumed_at_step": resume["wandb_step"]}, step=resume["wandb_step"])


def split_tags(*tags) -> list[str]:
    """Comma-separated text (or lists) -> tags in order, each once."""
    found = [t.strip() for group in tags for t in (group.split(",") if isinstance(group, str) else group)]
    return list(dict.fromkeys(t for t in found if t))
