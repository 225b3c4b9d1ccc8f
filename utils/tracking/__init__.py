"""The W&B boundary: the only package that imports wandb. Usage:
    run = tracking.init(cfg.to_dict(), run_id, out_dir, cfg.wandb_mode, tracking.RunOptions(project=cfg.project))
    cfg = Config.from_dict(run.config(exclude=ADDED_CONFIG_KEYS))   # values a sweep locked win
    run.log_eval_tables("val", ...); run.log(metrics); run.finish()

Run files, staged media and artifacts all go under out_dir, so an offline run can be copied and
synced whole. Mode "auto" means online when an API key is configured, else offline.
Beside them, in any mode, the scalars go to plain files that need no W&B to read (utils/runs.py):
out_dir/metrics.jsonl and out_dir/summary.json (with "_exit_code" once the run has finished).

The plain files are written at once; every W&B call (rows, tables, images, artifacts, summary)
goes, in order, to the run's own background thread, so building tables and staging checkpoints
overlaps the next epoch instead of delaying it. finish() waits for it; an error on that thread
is raised by the next call here.

One job per module: mode.py (which mode, a key, the server reachable), start.py (init), run.py (the Run: logging,
artifacts), ending.py (how a run ends: exit codes, stops, deadlines), tables.py (tables and media), api.py (the
public API: artifacts, sweeps), private.py (every use of wandb's private API, behind a version check: the one place
to look after a wandb upgrade).
"""
# the seams a test replaces live in their modules (api.wandb_api, mode._server_unreachable,
# private.stop_requested_in_wandb): patch them there, where they are looked up
from utils.tracking import api, mode, private, tables  # noqa: F401
from utils.tracking.api import SweepRun, download_artifact, sweep_runs_best_first  # noqa: F401
from utils.tracking.ending import MIN_FINISH_S, STOP_STATUS_TIMEOUT_S  # noqa: F401
from utils.tracking.mode import SERVER_TIMEOUT_S, has_api_key, resolve_mode  # noqa: F401
from utils.tracking.run import TABLES_SHARE, Run  # noqa: F401
from utils.tracking.start import INIT_TIMEOUT_S, RunOptions, init, split_tags  # noqa: F401
