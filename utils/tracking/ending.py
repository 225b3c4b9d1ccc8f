"""How a run ends (the Run's run_to_end and a stop's finish, utils/tracking/run.py): the one mapping of an outcome
to the exit code, what a stop was (a preemption, W&B's own request), a crash's traceback into the run, and the
process's end when W&B's finish outlasts a stop's time budget. Usage:
    code = run.run_to_end(work)    # 0, 1 after a UserError, 128 + signal after a stop
Each function takes the Run (utils/tracking/run.py) as `run`.
"""
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from utils import UserError, report_error
from utils.stop import Stopped, stop_budget_s
from utils.tracking import private

MIN_FINISH_S = 2  # the least time a stopped run's finish gets, even past its deadline
STOP_STATUS_TIMEOUT_S = 5  # the longest a stop waits for W&B's answer to "did you ask this run to stop?"


def run_to_end(run, work, stopped_note: str | Callable[[], str] = "") -> int:
    """work() inside the run, then finish it; the one mapping of how a run ends to its exit code: 0; 1 after a
    UserError (one 'error:' line on stderr, also in the summary); 128 + signal after a stop (utils/stop.py), 0
    for one W&B asked for under `wandb agent` (on_stop), said on stderr with stopped_note (or what it returns at
    the stop); any other exception finishes the run with 1 and propagates, its traceback in the run before the
    finish (summary `error`, and traceback.txt in the run's files), so a crashed trial says why in W&B. What is
    printed before finish reaches W&B's console log (--wandb_console)."""
    try:
        work()
    except UserError as e:
        report_error(e)
        run.set_summary({"error": str(e)})
        run.finish(exit_code=1)
        return 1
    except Stopped as e:
        run.set_summary({"stopped": f"{e} during {e.phase or 'set-up'}"})
        exit_code = e.exit_code
        try:
            exit_code = on_stop(run, e)
            run.finish(exit_code=exit_code, deadline=e.deadline)
        except Exception as error:  # noqa: BLE001 - W&B's service gone (SLURM signals every process of a job)
            abandon(run, exit_code, f"W&B's service process ended before the run could finish "
                                      f"({type(error).__name__}: {str(error)[:100]}), so the run exits now")
        note = stopped_note() if callable(stopped_note) else stopped_note
        print(f"stopped by {e}{f' during {e.phase}' if e.phase else ''}: {note}W&B run finished (exit code "
              f"{exit_code})", file=sys.stderr)
        return exit_code
    except BaseException as e:
        record_crash(run, e)
        run.finish(exit_code=1)
        raise
    return run.finish()

def on_stop(run, stop: Stopped) -> int:
    """What a stop was, into the run before it finishes, and the exit code the run ends with. Under `wandb agent`
    (WANDB_SWEEP_ID) one signal means two things: the agent passes a hyperband or UI stop on as SIGTERM, and a
    cluster taking the GPU back (or the agent shutting down) sends the same. Which it was:
    - W&B asked for it (its stop request reached the run, or the server, asked now, has the run stopped): a
      finished, stopped trial, exit 0, so the agent neither requeues it nor counts a failure (it gives up after
      WANDB_AGENT_MAX_INITIAL_FAILURES runs exit non-zero);
    - the server says it did not (or the run is offline, where nothing can ask it to stop), or the signal is
      SIGUSR1 (a scheduler's explicit notice: sbatch --signal=USR1@120): a preemption, marked preempting so that
      W&B requeues the trial and an agent on this machine continues it from this run folder; exit 128 + signal;
    - no answer from the server in time: assumed asked for (not marked preempting: a requeued trial that W&B
      stops again would loop), exit 0, and said.
    Anywhere else: 128 + signal."""
    if run.record is None or run.mode == "disabled" or not os.environ.get("WANDB_SWEEP_ID"):
        return stop.exit_code
    if stop.by_wandb:
        print("stopped by W&B (the sweep's early termination, or the UI's stop button): a finished trial")
        return 0
    if stop.signum == signal.SIGTERM:
        asked = stopped_in_wandb(run, min(STOP_STATUS_TIMEOUT_S, max(0.0, stop.deadline - time.monotonic()) / 4))
        if asked or asked is None:
            print("stopped by the sweep (its early termination, or the UI's stop button): a finished trial" if asked
                  else f"SIGTERM under wandb agent, and W&B's server did not say within {STOP_STATUS_TIMEOUT_S} s "
                       f"whether it asked for this stop: assumed it did (a finished trial, not requeued); a "
                       f"scheduler can mark a preemption explicitly with SIGUSR1")
            return 0
    run.wandb.mark_preempting()  # sent at once, ahead of anything still queued for W&B
    run.set_summary({"preempted": True})
    print(f"preempted ({signal.Signals(stop.signum).name} that W&B did not ask for): W&B requeues this trial; an "
          f"agent on this machine continues it from {run.record.dir}")
    return stop.exit_code

def stopped_in_wandb(run, timeout: float) -> bool | None:
    """Whether W&B asked this run to stop: what wandb-core last heard (at once), else the server asked now;
    False offline; None when the server does not answer within timeout."""
    if run.mode != "online":
        return False
    if private.stop_requested_in_wandb(run.wandb, timeout=min(0.5, timeout)):
        return True
    return private.stopped_on_server(run.wandb, timeout)

def record_crash(run, error: BaseException) -> None:
    """An unexpected exception, into the run before it finishes: the summary's `error`, and the whole traceback
    as out_dir/traceback.txt, also one of the W&B run's files (Python prints it on the console after)."""
    if run.record is None:
        return
    run.set_summary({"error": f"{type(error).__name__}: {error}"})
    path = run.record.dir / "traceback.txt"
    path.write_text("".join(traceback.format_exception(error)))
    run.save_file(path)

def finish_by(run, exit_code: int, deadline: float) -> int:
    """run.finish with a stop's deadline (time.monotonic()): a finish still waiting for W&B then (an upload on a
    slow link) ends the process there with exit_code, saying how to upload the rest, before the SIGKILL that
    follows a stop signal would end it unannounced. Python's own exit would wait for W&B again (wandb's atexit
    hook)."""
    outcome = []

    def finish_it():
        try:
            outcome.append(run._finish(exit_code))
        except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
            outcome.append(e)
    finishing = threading.Thread(target=finish_it, name="wandb-finish", daemon=True)
    finishing.start()
    finishing.join(max(MIN_FINISH_S, deadline - time.monotonic()))  # a stop noticed late still gets a moment
    if outcome:
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]
    abandon(run, exit_code, f"W&B is still uploading at the stop's time limit ({stop_budget_s():.0f} s), so the "
                            f"run exits now, before a SIGKILL would")


def abandon(run, exit_code: int, why: str) -> None:
    """End the process now with exit_code, the W&B run unfinished: summary.json gets _exit_code and
    wandb_unfinished, stderr why and the `wandb sync` line that uploads the rest (its .wandb file holds what
    W&B received). os._exit: Python's exit would wait on W&B again (wandb's atexit hook), and on loader workers
    that ignore the stop signal."""
    where = Path(run.wandb.dir).parent
    if run.record is not None:
        run.record.summary.update({"_exit_code": exit_code, "wandb_unfinished": True})
        run.record.write_summary()
    print(f"{why}: checkpoints, metrics.jsonl and summary.json are complete under "
          f"{run.record.dir if run.record else where}; upload what W&B has not with: wandb sync {where}",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
