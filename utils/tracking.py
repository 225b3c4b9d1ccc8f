"""The W&B boundary: the only module that imports wandb. Usage:
    run = tracking.init(cfg.to_dict(), run_id, out_dir, cfg.wandb_mode, project=cfg.project)
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
"""
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import wandb
from wandb.errors import AuthenticationError, CommError
from wandb.sdk.lib import wbauth

from utils import UserError
from utils.background import BackgroundWriter
from utils.runs import DEFAULT_PROJECT, RunRecord, random_id
from utils.stop import Stopped, stop_budget_s

THUMB_PX = 128  # longest side of table thumbnails


_SETTINGS_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                   "disabled": "disabled"}  # a settings file's mode (wandb's Settings.mode) -> ours


def _wandb_settings() -> wandb.Settings:
    """The settings wandb.init starts from, loaded as wandb.setup() loads them (wandb_setup._load_settings): the
    global file ($WANDB_CONFIG_DIR/settings, else ~/.config/wandb/settings; `wandb login --host` writes base_url
    there), the workspace file ./wandb/settings over it (`wandb offline` writes mode there), then WANDB_BASE_URL.
    A private Settings: loading wandb's session settings here would freeze the environment before init sets
    WANDB_DATA_DIR. Reads two files, no network."""
    settings = wandb.Settings(quiet=True)  # quiet: wandb.init itself says which settings files it loaded
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    settings.settings_system = str(Path(config_dir).expanduser() / "settings" if config_dir
                                   else Path("~", ".config", "wandb", "settings").expanduser())
    settings.update_from_system_settings()  # a broken file: wandb says why and ignores it, as wandb.init will
    if url := os.environ.get("WANDB_BASE_URL"):
        try:
            settings.update_from_env_vars({"WANDB_BASE_URL": url})
        except ValueError as e:  # pydantic's ValidationError
            msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
            raise UserError(f"WANDB_BASE_URL={url!r} is not a W&B server URL: {msg}") from None
    return settings


def has_api_key(settings: wandb.Settings | None = None) -> bool:
    """Whether wandb.init would find an API key for the configured server without prompting, looked up as wandb's
    own wbauth._use_system_auth does: WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, this session's wandb.login(), the
    netrc entry for the server's host ($NETRC, else ~/.netrc), an api_key in the settings files."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = settings if settings is not None else _wandb_settings()
    try:
        host = wbauth.HostUrl(settings.base_url)
    except ValueError as e:
        raise UserError(f"W&B server URL {settings.base_url}: {e}") from None
    if wbauth.session_credentials(host=host):
        return True
    try:
        found = wbauth.read_netrc_auth(host=host)
    except AuthenticationError:  # an entry wandb.init will refuse, saying why: a key all the same, not offline
        return True
    return bool(found or settings.api_key)


SERVER_TIMEOUT_S = 5  # how long a run waits to learn that W&B's server cannot be reached at all
INIT_TIMEOUT_S = 60  # wandb.init's own limit for an online run (wandb's default: 90 s) unless WANDB_INIT_TIMEOUT
TABLES_SHARE = 0.02  # the share of a run's time its evaluation tables may take (log_eval_tables)
MIN_FINISH_S = 2  # the least time a stopped run's finish gets, even past its deadline
STOP_STATUS_TIMEOUT_S = 5  # the longest a stop waits for W&B's answer to "did you ask this run to stop?"


def _unreachable(base_url: str, timeout: float = SERVER_TIMEOUT_S) -> str:
    """Why no TCP connection to the server at base_url (its host and port: else 443 for https, 80 for http) opens
    within timeout seconds, the name lookup included; "" when one does. Nothing is sent."""
    parts = urllib.parse.urlsplit(base_url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a port that is no number
        return str(e)
    if not host:
        return "no host in the URL"
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append("")
        except OSError as e:  # refused, no route, a name that does not resolve, timed out
            outcome.append(e.strerror or str(e) or type(e).__name__)
    probe = threading.Thread(target=connect, name="wandb-server-probe", daemon=True)  # a name lookup has no timeout
    probe.start()
    probe.join(timeout)
    return outcome[0] if outcome else "no answer"


def _server_unreachable() -> str:
    """"" when W&B's configured server (as wandb.init will find it) accepts a TCP connection within
    SERVER_TIMEOUT_S; else that it cannot be reached, its URL and why, as the start of a sentence."""
    url = _wandb_settings().base_url
    why = _unreachable(url)
    return f"W&B's server {url} could not be reached within {SERVER_TIMEOUT_S} s ({why})" if why else ""


def resolve_mode(requested: str) -> str:
    """The mode a run records in, as _requested_mode resolves it; under `wandb agent` (WANDB_SWEEP_ID) an online
    run whose server cannot be reached within SERVER_TIMEOUT_S is a UserError naming it, not a wait for
    wandb.init's timeout and a traceback (a standalone run goes offline instead: init)."""
    mode = _requested_mode(requested)
    if mode == "online" and os.environ.get("WANDB_SWEEP_ID") and (unreachable := _server_unreachable()):
        raise UserError(f"wandb agent runs report to the sweep's server, but {unreachable}: check the network "
                        f"and the server, or run offline sweeps with `python sweep.py sweep.yaml`")
    return mode


def _requested_mode(requested: str) -> str:
    """--wandb_mode beats WANDB_MODE beats the mode in wandb's settings files (`wandb offline`: ./wandb/settings,
    which beats the global file) beats auto-detection: online when wandb.init would find an API key for the
    configured server (WANDB_BASE_URL, else the base_url `wandb login --host URL` saved, else wandb's default),
    else offline, since online wandb.init would fail or prompt. Under `wandb agent` (WANDB_SWEEP_ID) the run must
    report to the sweep's server, so auto never goes offline there: the settings files' mode is not applied and
    no key is a UserError. A resolved mode resolves to itself."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":  # wandb's old name for offline
        return "offline"
    settings = _wandb_settings()
    sweep = os.environ.get("WANDB_SWEEP_ID")
    if not sweep and "mode" in settings.model_fields_set and settings.mode in _SETTINGS_MODES:  # set by a file
        return _SETTINGS_MODES[settings.mode]
    if has_api_key(settings):
        return "online"
    if sweep:
        login = "wandb login" + (f" --host {settings.base_url}" if "base_url" in settings.model_fields_set else "")
        raise UserError(f"wandb agent runs report to the sweep on {settings.base_url}, but no W&B API key is "
                        f"configured for it: run `{login}` (or set WANDB_API_KEY), or run offline sweeps with "
                        f"`python sweep.py sweep.yaml`")
    return "offline"


def init(config: dict, run_id: str, out_dir: Path, mode: str, *, project: str = "", entity: str = "", name: str = "",
         job_type: str = "train", resume: dict | None = None, console: bool = True, record: bool = True,
         notes: str = "", tags: str | list = "", stop_fn=None) -> "Run":
    """resume: a resumed run's {"wandb_step", "history_rows", "summary"} from its last saved state; W&B
    continues the same run id (offline: a new offline-run-...-<id>-N folder that syncs into it). Under `wandb agent`
    a run id may be one W&B requeued after a preemption: the run is always continued there, never replaced.
    stop_fn: called (on a W&B thread) when W&B asks the run to stop (the UI's stop button, a sweep's early
    termination), in place of wandb's own SIGINT to the main thread (utils/stop.py StopSignal.request).
    console: W&B also captures stdout/stderr. record False: no run files at all (torchrun's ranks > 0).
    tags: added to those in $WANDB_TAGS (the offline sweep runner's), which an explicit list would replace.
    save_code: W&B keeps the script (files/code/) and, in a git checkout, the commit, remote and diff.patch."""
    if not record:
        return Run(wandb.init(mode="disabled", config=config, id=run_id), None)
    # a mode resolved already (train.py resolves it first, on every rank) is not resolved, nor probed, again
    mode = resolve_mode(mode) if mode == "auto" else mode  # under `wandb agent`: a missing key or server raises
    sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    # a standalone run whose server cannot be reached goes offline at once, saying so, instead of waiting
    # for wandb.init's timeout and a traceback
    unreachable = _server_unreachable() if mode == "online" and not sweep else ""
    mode = "offline" if unreachable else mode
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DATA_DIR"] = str(out_dir / "wandb-data")  # staged tables, media and artifact files
    where = {"project": project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, "entity": entity or None,
             "id": run_id}
    if sweep:  # under `wandb agent` the sweep decides all three (ours: ignored, warned)
        where = {}

    def start(mode):
        settings = {"console": "auto" if console else "off", "save_code": True,
                    **({"stop_fn": stop_fn} if stop_fn is not None else {})}
        if mode == "online" and not os.environ.get("WANDB_INIT_TIMEOUT"):  # a server that connects, then hangs
            settings["init_timeout"] = INIT_TIMEOUT_S
        return wandb.init(
            **where, name=name or (f"{config.get('model', 'run')}-{run_id}" if mode == "offline" else None),
            dir=str(out_dir), config=config, mode=mode, job_type=job_type, resume="allow" if resume or sweep else None,
            settings=wandb.Settings(**settings), notes=notes or None,
            tags=split_tags(os.environ.get("WANDB_TAGS", ""), tags) or None)
    try:
        run = start(mode)
    except (CommError, TimeoutError) as e:  # init_timeout passed (CommError), or wandb's grace period after it
        if mode != "online" or sweep:
            raise
        limit = os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]  # wandb adds lines of advice
        unreachable = f"W&B's server {_wandb_settings().base_url} could not be reached within {limit} s ({why})"
        mode = "offline"
        wandb.teardown()  # the failed online attempt's service; the offline run starts afresh
        run = start(mode)
    for key, step in [("train/*", "epoch"), ("val/*", "epoch"), ("lr", "epoch"), ("fold*", "epoch"), ("cv/*", "fold")]:
        run.define_metric(key, step_metric=step)  # fold<k>/...: a cross-validated run's folds
    record = RunRecord(out_dir, resume)
    if resume and mode != "disabled":
        run.log({"resumed_at_step": resume["wandb_step"]}, step=resume["wandb_step"])  # steps go on from there
    if mode == "offline":
        # every attempt of a resumed run is a folder of its own under out_dir/wandb/: sync them all, in order
        sync = f"wandb sync {Path(run.dir).parent.parent}"
        print(f"{unreachable}, so this run is recorded offline. Upload it later with: {sync}" if unreachable
              else f"W&B is offline. Upload this run later with: {sync}")
    return Run(run, record)


def split_tags(*tags) -> list[str]:
    """Comma-separated text (or lists) -> tags in order, each once."""
    found = [t.strip() for group in tags for t in (group.split(",") if isinstance(group, str) else group)]
    return list(dict.fromkeys(t for t in found if t))


class Run:
    """One W&B run, its plain-file record (None on torchrun's ranks > 0) and its background writer (None when
    W&B is disabled). Every method is safe in every mode: what W&B would not keep is not built."""

    def __init__(self, run, record: RunRecord | None):
        self.wandb, self.record = run, record
        enabled = record is not None and run.settings.mode != "disabled"
        self.writer = BackgroundWriter("wandb-writer") if enabled else None
        self.next_step = int(run.step) if enabled else 0  # W&B's next step, counted here
        self.thumbs: dict = {}  # (table prefix, sample id) -> its wandb.Image, encoded once per run
        self.tables_seconds = 0.0  # what the last set of evaluation tables took to log (on the writer thread)
        self.tables_at: dict = {}  # table prefix -> time.monotonic() its last set was logged
        self.pending_tables: dict = {}  # table prefix -> the newest set held back (log_eval_tables)

    @property
    def id(self) -> str:
        return self.wandb.id

    @property
    def mode(self) -> str:
        return self.wandb.settings.mode

    @property
    def entity(self) -> str:
        return self.wandb.entity

    @property
    def step(self) -> int:
        """W&B's own step counter (what it has committed so far)."""
        return self.wandb.step

    def _submit(self, fn) -> None:
        self.writer.submit(fn) if self.writer is not None else fn()

    def config(self, exclude=()) -> dict:
        """The run's config as W&B holds it, sweep-locked values included, without W&B's own and `exclude` keys."""
        return {k: v for k, v in dict(self.wandb.config).items() if not k.startswith("_") and k not in exclude}

    def update_config(self, values: dict) -> None:
        """Entries beside the Config keys (workflows/lineage.py's record), replaced on a resumed run."""
        values = dict(values)
        self._submit(lambda: self.wandb.config.update(values, allow_val_change=True))

    def log(self, metrics: dict) -> None:
        self._submit(lambda: self.wandb.log(metrics))  # commits the row, with any media logged before it (commit=False)
        if self.record is not None:
            self.next_step += self.writer is not None
            self.record.append(metrics)

    def set_summary(self, values: dict) -> None:
        values = dict(values)

        def update():
            for k, v in values.items():
                self.wandb.summary[k] = v
        self._submit(update)
        if self.record is not None:
            self.record.update_summary(values)

    def position(self) -> dict:
        """Where the run's record stands, for a resume state: W&B's next step, plain history rows, summary."""
        if self.record is None:
            return {"wandb_step": 0, "history_rows": 0, "summary": {}}
        return {"wandb_step": self.next_step, "history_rows": self.record.rows, "summary": dict(self.record.summary)}

    def history(self, prefix: str = "") -> list[dict]:
        return self.record.history(prefix) if self.record is not None else []

    def use_artifact(self, ref: str, download_to: Path | None = None) -> Path | None:
        """Online: the run uses artifact `ref` (an input edge in W&B's lineage graph), downloaded into download_to
        when given; returns that folder. Offline and disabled runs cannot (W&B refuses): None."""
        if self.mode != "online":
            return None
        found = []

        def use():
            try:
                artifact = self.wandb.use_artifact(ref)
                found.append(Path(artifact.download(root=str(download_to))) if download_to is not None else None)
            except Exception as e:  # noqa: BLE001 - wandb raises CommError, ValueError...
                raise UserError(f"W&B artifact {ref}: {e}") from None
        self._submit(use)  # in order with the run's other W&B calls, and waited for
        if self.writer is not None:
            self.writer.drain()
        return found[0]

    def log_eval_tables(self, prefix: str, ids, images, y_true, probs, classes, metrics: dict, max_rows: int,
                        hold: bool = True) -> None:
        """Prediction table, misclassified table (most confident mistakes first), confusion matrix and
        per-class scores, added to the next history row (run.log). `images(i)` returns sample i as
        HxWx3 uint8; it is called on the writer thread, after this returns.
        W&B stages every image of every table again: about 0.65 s a set of 200-row tables on 2 cores. To keep
        that under TABLES_SHARE of the run's time, a set due sooner than its cost / TABLES_SHARE after the last
        (short epochs) is held unless hold is False (the fit's last epoch), a newer one replacing it, until
        log_pending_tables adds it to a later row (the last epoch's)."""
        if self.mode == "disabled":  # nothing would keep them; skip decoding and staging images
            return
        tables = (prefix, ids, images, y_true, probs, classes, metrics, max_rows)
        if hold and time.monotonic() - self.tables_at.get(prefix, -np.inf) < self.tables_seconds / TABLES_SHARE:
            self.pending_tables[prefix] = tables
            return
        self.pending_tables.pop(prefix, None)
        self.tables_at[prefix] = time.monotonic()
        self._submit(lambda: self._log_eval_tables(*tables))

    def log_pending_tables(self, prefix: str) -> None:
        """The newest held set of tables under prefix (log_eval_tables), added to the next history row (run.log):
        the best epoch of a fit that ends always has its tables in W&B."""
        tables = self.pending_tables.pop(prefix, None)
        if tables is not None:
            self.tables_at[prefix] = time.monotonic()
            self._submit(lambda: self._log_eval_tables(*tables))

    def _log_eval_tables(self, prefix, ids, images, y_true, probs, classes, metrics, max_rows) -> None:
        start = time.perf_counter()

        def thumb(r):
            key = (prefix, str(ids[r]))
            if key not in self.thumbs:  # the same sample at every new best: one PNG
                self.thumbs[key] = _thumb(images(r))
            return self.thumbs[key]
        pred = probs.argmax(1)
        wrong = np.flatnonzero(pred != y_true)
        wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:max_rows]
        per_class = wandb.Table(columns=["class", "precision", "recall", "f1", "auc", "support"], data=[
            [c, float(metrics["precision"][i]), float(metrics["recall"][i]), float(metrics["f1"][i]),
             None if np.isnan(metrics["auc"][i]) else float(metrics["auc"][i]), int(metrics["support"][i])]
            for i, c in enumerate(classes)])
        self.wandb.log({
            f"{prefix}/predictions": _prediction_table(np.arange(min(max_rows, len(y_true))), ids, thumb, y_true, probs,
                                                       classes),
            f"{prefix}/misclassified": _prediction_table(wrong, ids, thumb, y_true, probs, classes),
            f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=y_true.tolist(), preds=pred.tolist(), class_names=list(classes)),
            f"{prefix}/per_class": per_class,
            f"{prefix}/per_class_f1": wandb.plot.bar(per_class, "class", "f1", title=f"{prefix} F1 per class"),
            f"{prefix}/confused_pairs": _confused_pairs(y_true, probs, classes, metrics["confusion"], thumb),
        }, commit=False)
        self.tables_seconds = time.perf_counter() - start

    def log_table(self, key: str, columns: list[str], rows: list[list], full_copy: Path | None = None) -> None:
        """A table; HxWx3 uint8 cells become thumbnails. W&B keeps at most wandb.Table.MAX_ROWS rows of a logged
        table and cuts the rest silently: here the first rows are logged and the cut is said on the console,
        naming full_copy (a file with every row) when there is one."""
        if self.mode == "disabled":
            return
        if len(rows) > wandb.Table.MAX_ROWS:
            print(f"note: W&B table {key}: the first {wandb.Table.MAX_ROWS:,} of {len(rows):,} rows are logged (W&B's "
                  f"limit for one table)" + (f"; every row is in {full_copy}" if full_copy else ""))
            rows = rows[:wandb.Table.MAX_ROWS]

        def log_it():
            table = wandb.Table(columns=columns)
            for row in rows:
                table.add_data(*[_thumb(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v for v in row])
            self.wandb.log({key: table})
        self._submit(log_it)
        self.next_step += 1

    def log_artifact(self, path: Path, name: str, type: str, metadata: dict | None = None, aliases=()) -> None:
        if self.mode == "disabled":  # W&B would still stage a copy of the file
            return
        path = Path(path)
        # the file as it is now, whatever replaces it before the writer stages it (files here are replaced by rename)
        snapshot = path.with_name(f".{path.name}.artifact-{random_id()}")
        try:
            os.link(path, snapshot)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, snapshot)

        def log_it():
            try:
                artifact = wandb.Artifact(name, type=type, metadata=metadata)
                # copied into W&B's staging area (under out_dir) here; skip_cache: no second copy in ~/.cache/wandb
                artifact.add_file(str(snapshot), name=path.name, skip_cache=True)
                self.wandb.log_artifact(artifact, aliases=list(aliases))
            finally:
                snapshot.unlink(missing_ok=True)
        self._submit(log_it)

    def use_file(self, path: Path, name: str, type: str, metadata: dict | None = None) -> None:
        """A local file as an artifact this run reads: online, an input of the run in W&B's lineage graph; offline
        (where W&B refuses use_artifact) logged by the run, so it still reaches W&B on sync."""
        if self.mode != "online":
            self.log_artifact(path, name, type, metadata)
            return

        def use_it():
            artifact = wandb.Artifact(name, type=type, metadata=metadata)
            artifact.add_file(str(path))
            self.wandb.use_artifact(artifact)
        self._submit(use_it)

    def save_file(self, path: Path) -> None:
        """A plain file of the run folder also in the W&B run's files (offline: synced with the run)."""
        if self.mode != "disabled":
            self._submit(lambda: self.wandb.save(str(path), base_path=str(Path(path).parent), policy="now"))

    def log_dataset(self, name: str, files: list[tuple[Path, str]], columns: list[str], rows: list[list],
                    metadata: dict, references: bool = False, aliases=(), description: str = "") -> None:
        """A W&B artifact of type dataset: each (file, its name in the artifact) copied in, or with references a
        file:// reference with its checksum (nothing copied); and the table `samples` of `rows`, whose
        callable cells are called here (one image decoded at a time) and HxWx3 uint8 cells become thumbnails."""
        if self.mode == "disabled":
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
            self.wandb.log_artifact(artifact, aliases=list(aliases))
        self._submit(log_it)

    def run_to_end(self, work, stopped_note: str | Callable[[], str] = "") -> int:
        """work() inside the run, then finish it; the one mapping of how a run ends to its exit code: 0; 1 after a
        UserError (one 'error:' line on stderr, also in the summary); 128 + signal after a stop (utils/stop.py),
        said on stderr with stopped_note (or what it returns at the stop); any other exception finishes the run with
        1 and propagates, its traceback in the run before the finish (summary `error`, and traceback.txt in the run's
        files), so a crashed trial says why in W&B. What is printed before finish reaches W&B's console log
        (--wandb_console)."""
        try:
            work()
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            self.set_summary({"error": str(e)})
            self.finish(exit_code=1)
            return 1
        except Stopped as e:
            self.set_summary({"stopped": f"{e} during {e.phase or 'set-up'}"})
            try:
                self.on_stop(e)
                self.finish(exit_code=e.exit_code, deadline=e.deadline)
            except Exception as error:  # noqa: BLE001 - W&B's service gone (SLURM signals every process of a job)
                self.abandon(e.exit_code, f"W&B's service process ended before the run could finish "
                                          f"({type(error).__name__}: {str(error)[:100]}), so the run exits now")
            note = stopped_note() if callable(stopped_note) else stopped_note
            print(f"stopped by {e}{f' during {e.phase}' if e.phase else ''}: {note}W&B run finished (exit code "
                  f"{e.exit_code})", file=sys.stderr)
            return e.exit_code
        except BaseException as e:
            self.record_crash(e)
            self.finish(exit_code=1)
            raise
        return self.finish()

    def on_stop(self, stop: Stopped) -> None:
        """What a stop was, in the run before it finishes. Under `wandb agent` a SIGTERM that W&B did not ask for
        (asked as W&B's stop poller asks: the run's stop status) is a preemption (a cluster or a spot machine taking
        the GPU back, the agent itself shutting down): the run is marked preempting, so that W&B requeues the trial,
        and the agent that picks it up continues from this run folder where it is on the same machine, instead of
        the sweep learning from a "failed" trial that this configuration is the worst."""
        if self.record is None or self.mode == "disabled":
            return
        if not (os.environ.get("WANDB_SWEEP_ID") and stop.signum == signal.SIGTERM and not stop.by_wandb):
            return
        if stop_requested_in_wandb(self.wandb, timeout=min(STOP_STATUS_TIMEOUT_S,
                                                           max(0.0, stop.deadline - time.monotonic()) / 4)):
            print("stopped by the sweep (its early termination, or the UI's stop button)")
            return
        self.wandb.mark_preempting()  # sent at once, ahead of anything still queued for W&B
        self.set_summary({"preempted": True})
        print(f"preempted (SIGTERM that W&B did not ask for): W&B requeues this trial; an agent on this machine "
              f"continues it from {self.record.dir}")

    def record_crash(self, error: BaseException) -> None:
        """An unexpected exception, into the run before it finishes: the summary's `error`, and the whole traceback
        as out_dir/traceback.txt, also one of the W&B run's files (Python prints it on the console after)."""
        if self.record is None:
            return
        self.set_summary({"error": f"{type(error).__name__}: {error}"})
        path = self.record.dir / "traceback.txt"
        path.write_text("".join(traceback.format_exception(error)))
        self.save_file(path)

    def finish(self, exit_code: int = 0, deadline: float | None = None) -> int:
        """Wait for the writer thread's W&B calls, then finish the run; _exit_code goes in summary.json last.
        Returns the exit code: 1 instead of 0 when a W&B call on the writer thread failed (said on stderr).
        deadline (time.monotonic(); a stop's): a finish still waiting for W&B then (an upload on a slow link) ends
        the process there with exit_code, saying how to upload the rest, before the SIGKILL that follows a stop
        signal would end it unannounced. Python's own exit would wait for W&B again (wandb's atexit hook)."""
        if deadline is None:
            return self._finish(exit_code)
        outcome = []

        def finish_it():
            try:
                outcome.append(self._finish(exit_code))
            except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
                outcome.append(e)
        finishing = threading.Thread(target=finish_it, name="wandb-finish", daemon=True)
        finishing.start()
        finishing.join(max(MIN_FINISH_S, deadline - time.monotonic()))  # a stop noticed late still gets a moment
        if outcome:
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            return outcome[0]
        self.abandon(exit_code, f"W&B is still uploading at the stop's time limit ({stop_budget_s():.0f} s), so the "
                                f"run exits now, before a SIGKILL would")

    def abandon(self, exit_code: int, why: str) -> None:
        """End the process now with exit_code, the W&B run unfinished: summary.json gets _exit_code and
        wandb_unfinished, stderr why and the `wandb sync` line that uploads the rest (its .wandb file holds what
        W&B received). os._exit: Python's exit would wait on W&B again (wandb's atexit hook), and on loader workers
        that ignore the stop signal."""
        where = Path(self.wandb.dir).parent
        if self.record is not None:
            self.record.summary.update({"_exit_code": exit_code, "wandb_unfinished": True})
            self.record.write_summary()
        print(f"{why}: checkpoints, metrics.jsonl and summary.json are complete under "
              f"{self.record.dir if self.record else where}; upload what W&B has not with: wandb sync {where}",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    def _finish(self, exit_code: int) -> int:
        error = None
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:  # noqa: BLE001 - still finish the run and write the exit code
                error, exit_code = e, exit_code or 1
            self.writer = None
        self.wandb.finish(exit_code=exit_code)
        if self.record is not None:
            self.record.summary["_exit_code"] = exit_code
            self.record.write_summary()
        # wandb's process-wide setup caches the environment (WANDB_SWEEP_PARAM_PATH among it) at the first
        # init; tear it down so a later run in the same process starts from the environment as it is then
        wandb.teardown()
        if error is not None:
            print(f"error: W&B could not record part of the run ({type(error).__name__}: {error}); the checkpoints, "
                  f"metrics.jsonl and summary.json are complete", file=sys.stderr)
        return exit_code


def stop_requested_in_wandb(run, timeout: float) -> bool:
    """Whether W&B asked this run to stop (the UI's stop button; a sweep's early termination, which the agent also
    passes on as SIGTERM): the question wandb's own stop poller asks every 15 s (wandb/sdk/lib/run_stopping.py),
    asked now. No answer within timeout (no server, or none reachable) is False. Offline W&B answers at once,
    with False: nothing can ask an offline run to stop."""
    from wandb.proto import wandb_internal_pb2 as pb
    try:
        handle = run._interface._deliver(pb.Record(request=pb.Request(stop_status=pb.StopStatusRequest())))
        return bool(handle.wait_or(timeout=timeout).response.stop_status_response.run_should_stop)
    except Exception:  # noqa: BLE001 - a timeout, an abandoned handle, a wandb whose internals moved
        return False


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


def _confused_pairs(y_true, probs, classes, confusion: np.ndarray, thumb, top: int = 10, examples: int = 4):
    """The most frequent (true, predicted) mistakes, each with its most confident examples."""
    pred = probs.argmax(1)
    pairs = sorted(((int(confusion[t, p]), t, p) for t, p in zip(*np.nonzero(confusion)) if t != p),
                   key=lambda c: (-c[0], c[1], c[2]))[:top]
    examples_columns = [f"example_{k}" for k in range(1, examples + 1)]
    table = wandb.Table(columns=["true", "predicted", "count", "share_of_true", *examples_columns])
    for n, t, p in pairs:
        rows = np.flatnonzero((y_true == t) & (pred == p))
        rows = rows[np.argsort(-probs[rows, p], kind="stable")][:examples]
        table.add_data(classes[t], classes[p], n, n / int(confusion[t].sum()),
                       *[thumb(r) for r in rows], *[None] * (examples - len(rows)))
    return table


def wandb_api():
    """The W&B public API (needs a server and a key): the one seam tests replace with a fake."""
    return wandb.Api()


def download_artifact(ref: str, root: Path) -> Path:
    """Download ENTITY/PROJECT/NAME:ALIAS into root (files already there with the same digest are kept)."""
    try:
        artifact = wandb_api().artifact(ref)
    except Exception as e:  # noqa: BLE001 - wandb raises CommError, ValueError, UsageError...
        raise UserError(f"cannot fetch W&B artifact {ref}: {e}; offline, pass the run dir or checkpoint file "
                        f"instead") from None
    return Path(artifact.download(root=str(root)))


class SweepRun(NamedTuple):
    id: str
    config: dict
    models: list[str]  # its committed model artifacts with alias best, by collection: model-<id>[-fold<k>]


def sweep_runs_best_first(path: str) -> Iterator[SweepRun]:
    """The finished runs (W&B run.state "finished") of an online sweep ENTITY/PROJECT/ID that have the sweep's
    metric in their summary, best first by it. Lazy: each run's logged artifacts are listed (one API call) only
    when the caller takes that run."""
    try:
        sweep = wandb_api().sweep(path)
        metric = sweep.config.get("metric") or {}
        name, maximize = metric.get("name"), metric.get("goal", "minimize") == "maximize"
        scored = [r for r in sweep.runs if r.state == "finished" and isinstance(r.summary.get(name), (int, float))]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read W&B sweep {path}: {e}") from None
    scored.sort(key=lambda r: r.summary[name], reverse=maximize)
    for r in scored:
        try:
            models = sorted({a.name.split(":")[0] for a in r.logged_artifacts()
                             if a.type == "model" and "best" in a.aliases and a.state == "COMMITTED"})
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot list the artifacts of W&B run {r.id} of sweep {path}: {e}") from None
        yield SweepRun(r.id, dict(r.config), models)
