"""The Run that init returns (utils/tracking/start.py): one W&B run's logging, tables, artifacts, and its end
(utils/tracking/ending.py).
Every W&B call goes, in order, to the run's own background thread; the plain files (metrics.jsonl, summary.json)
are written at once. Usage:
    run.log(metrics); run.log_eval_tables("val", ...); run.log_artifact(path, name, "model")
    code = run.run_to_end(work)    # 0, 1 after a UserError, 128 + signal after a stop
"""
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import wandb

from utils import UserError
from utils.background import BackgroundWriter
from utils.metrics import Predictions
from utils.runs import RunRecord, random_id
from utils.tracking import api, ending, private, tables

TABLES_SHARE = 0.02  # the share of a run's time its evaluation tables may take (log_eval_tables)


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
        self.noted: set = set()  # table prefixes whose cut confusion matrix has been said on the console
        self.step_prefixes: set = set()  # the prefixes (fold<k>/, final/) whose step metrics are defined

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
        """Entries beside the Config keys (workflows/lineage.py's record), replaced on a resumed run. Keys a sweep
        locked are left out (wandb would drop them, warning): what they resolved to goes under keys of its own."""
        locked = private.locked_config_keys(self.wandb) if self.record is not None else set()
        values = {k: v for k, v in values.items() if k not in locked}
        self._submit(lambda: self.wandb.config.update(values, allow_val_change=True))

    def log(self, metrics: dict) -> None:
        self._submit(lambda: self.wandb.log(metrics))  # commits the row, with any media logged before it (commit=False)
        if self.record is not None:
            self.next_step += self.writer is not None
            self.record.append(metrics)

    def log_step(self, prefix: str, step: int, values: dict) -> None:
        """A row of optimizer-step values (train/loss_step, ...) against its own step metric, {prefix}global_step,
        so step charts line up across a resume whatever W&B's step is; W&B only (metrics.jsonl keeps epoch rows)."""
        if self.record is None or self.writer is None:
            return
        step_key = f"{prefix}global_step"
        if prefix not in self.step_prefixes:  # explicit definitions win over the train/* -> epoch glob
            self.step_prefixes.add(prefix)
            keys = [prefix + k for k in values]

            def define():
                self.wandb.define_metric(step_key)
                for key in keys:
                    self.wandb.define_metric(key, step_metric=step_key)
            self._submit(define)
        row = {step_key: step, **{prefix + k: v for k, v in values.items()}}
        self._submit(lambda: self.wandb.log(row))
        self.next_step += 1

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

    def log_eval_tables(self, prefix: str, preds: Predictions, metrics: dict, max_rows: int, hold: bool = True) -> None:
        """Prediction table, misclassified table (most confident mistakes first), confusion matrix and
        per-class scores, added to the next history row (run.log). `preds.images(i)` returns sample i as
        HxWx3 uint8; it is called on the writer thread, after this returns.
        W&B stages every image of every table again: about 0.65 s a set of 200-row tables on 2 cores. To keep
        that under TABLES_SHARE of the run's time, a set due sooner than its cost / TABLES_SHARE after the last
        (short epochs) is held unless hold is False (the fit's last epoch), a newer one replacing it, until
        log_pending_tables adds it to a later row (the last epoch's)."""
        if self.mode == "disabled":  # nothing would keep them; skip decoding and staging images
            return
        tables = (prefix, preds, metrics, max_rows)
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

    def _log_eval_tables(self, prefix: str, preds: Predictions, metrics: dict, max_rows: int) -> None:
        start = time.perf_counter()
        ids, images, y_true, probs, classes = preds.ids, preds.images, preds.y_true, preds.probs, preds.classes

        def thumb(r):
            key = (prefix, str(ids[r]))
            if key not in self.thumbs:  # the same sample at every new best: one PNG
                self.thumbs[key] = tables.thumb(images(r))
            return self.thumbs[key]
        pred = probs.argmax(1)
        wrong = np.flatnonzero(pred != y_true)
        wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:max_rows]
        confusion, note = tables.confusion_matrix(y_true, pred, list(classes), metrics["confusion"])
        if note and prefix not in self.noted:
            self.noted.add(prefix)
            print(f"note: W&B chart {prefix}/confusion_matrix: {note}; report.html has every class")
        per_class = wandb.Table(columns=["class", "precision", "recall", "f1", "auc", "support"], data=[
            [c, float(metrics["precision"][i]), float(metrics["recall"][i]), float(metrics["f1"][i]),
             None if np.isnan(metrics["auc"][i]) else float(metrics["auc"][i]), int(metrics["support"][i])]
            for i, c in enumerate(classes)])
        self.wandb.log({
            f"{prefix}/predictions": tables.prediction_table(np.arange(min(max_rows, len(y_true))), ids, thumb, y_true,
                                                             probs, classes),
            f"{prefix}/misclassified": tables.prediction_table(wrong, ids, thumb, y_true, probs, classes),
            f"{prefix}/confusion_matrix": confusion,
            f"{prefix}/per_class": per_class,
            f"{prefix}/per_class_f1": wandb.plot.bar(per_class, "class", "f1", title=f"{prefix} F1 per class"),
            f"{prefix}/confused_pairs": tables.confused_pairs(y_true, probs, classes, metrics["confusion"], thumb),
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
                table.add_data(*[tables.thumb(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v for v in row])
            self.wandb.log({key: table})
        self._submit(log_it)
        self.next_step += 1

    def has_artifact(self, name: str, alias: str) -> bool:
        """Whether W&B's server has version `alias` of this run's project's artifact `name` committed (its upload
        finished), asked now; False when it does not say so in time."""
        return api.artifact_state(f"{self.entity}/{self.wandb.project}/{name}:{alias}") == "COMMITTED"

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
        """A local file as an artifact this run reads: online, an input of the run in W&B's lineage graph, recorded by
        wandb-core once its upload commits (the run never waits for it; a failure is a note); offline (where W&B
        refuses use_artifact) logged by the run, so it still reaches W&B on sync."""
        if self.mode != "online":
            self.log_artifact(path, name, type, metadata)
            return

        def use_it():
            try:
                artifact = wandb.Artifact(name, type=type, metadata=metadata)
                artifact.add_file(str(path))
                private.use_after_commit(self.wandb, artifact)  # never waits for the upload
            except Exception as e:  # noqa: BLE001 - an edge in the lineage graph is not worth the run
                print(f"note: W&B artifact {name} was not recorded as this run's input ({type(e).__name__}: {e})")
        self._submit(use_it)

    def save_file(self, path: Path) -> None:
        """A plain file of the run folder also in the W&B run's files (offline: synced with the run)."""
        if self.mode != "disabled":
            self._submit(lambda: self.wandb.save(str(path), base_path=str(Path(path).parent), policy="now"))

    def log_dataset(self, name: str, files: list[tuple[Path, str]], columns: list[str], rows: list[list],
                    metadata: dict, references: bool = False, aliases=(), description: str = "") -> None:
        """A W&B artifact of type dataset: each (file, its name in the artifact) copied in, or with references a
        file:// reference with its checksum (nothing copied); and the table `samples` of `rows`, whose
        callable cells are called here (one image decoded at a time) and HxWx3 uint8 cells become thumbnails. W&B
        keeps wandb.Table.MAX_ARTIFACT_ROWS rows of an artifact's table: the first ones are logged, the cut said."""
        if self.mode == "disabled":
            return
        limit = wandb.Table.MAX_ARTIFACT_ROWS
        if len(rows) > limit:
            print(f"note: W&B dataset {name}: its samples table has the first {limit:,} of {len(rows):,} images (W&B's "
                  f"limit for an artifact's table)")

        def log_it():
            artifact = wandb.Artifact(name, type="dataset", description=description or None, metadata=metadata)
            for path, arcname in files:
                if references:
                    artifact.add_reference(Path(path).resolve().as_uri(), name=arcname, checksum=True)
                else:
                    artifact.add_file(str(path), name=arcname)
            table = wandb.Table(columns=columns)
            for row in rows[:limit]:
                cells = [v() if callable(v) else v for v in row]
                table.add_data(*[tables.thumb(v) if isinstance(v, np.ndarray) and v.ndim == 3 else v for v in cells])
            artifact.add(table, "samples")
            self.wandb.log_artifact(artifact, aliases=list(aliases))
        self._submit(log_it)

    def run_to_end(self, work, stopped_note: str | Callable[[], str] = "") -> int:
        """work() inside the run, then finish it: the exit code (utils/tracking/ending.py, how a run ends)."""
        return ending.run_to_end(self, work, stopped_note)

    def finish(self, exit_code: int = 0, deadline: float | None = None) -> int:
        """Wait for the writer thread's W&B calls, then finish the run; _exit_code goes in summary.json last.
        Returns the exit code: 1 instead of 0 when a W&B call on the writer thread failed (said on stderr).
        deadline (time.monotonic(); a stop's): past it, the process ends with exit_code (ending.finish_by)."""
        return self._finish(exit_code) if deadline is None else ending.finish_by(self, exit_code, deadline)

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
