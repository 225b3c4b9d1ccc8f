"""The offline sweep runner's engine room (sweep.py drives it): W&B's `sweeps` engine proposes, each trial is
train.py launched as `wandb agent` launches it (its own process group, its GPU, its param file), and
every state change is written to the sweep dir first, so a killed runner restarted with the same
command carries on: finished trials stay, interrupted ones resume from their run folders.

Usage: runner = Runner(sweep, sdir, info, RunnerSettings(count=8, workers=2, max_failures=3, gpus=[], seed=0))
       code = runner.run()
"""
import ctypes
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import cores
from utils.runs import random_id, read_local
from utils.stop import StopSignal
from workflows.resume import RESUME_FILE
from workflows.sweep import (
    DONE,
    ENGINE_STATE,
    LIVE,
    SweepDir,
    Trial,
    agent_command,
    param_file_text,
    plain,
    short,
    sweeps_engine,
    varied_keys,
    write_leaderboard,
)


def _now() -> str:
    return time.strftime("%H:%M:%S")


def _ended(trial: Trial, code: int | None, otherwise: str) -> str:
    """A trial's state once its process is gone: exit 0 finished it; a hyperband stop stopped it."""
    return "finished" if code == 0 else "stopped" if trial.state == "stopping" else otherwise


def _trial_alive(pid: int, trial_id: str) -> bool:
    """True while that pid is still this trial's process (its environment names the run id), not a
    zombie nobody reaped and not an unrelated process that got the pid later."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return f"WANDB_RUN_ID={trial_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS): signal 0 only asks whether the pid exists
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False


def _die_with_parent(runner_pid: int) -> None:
    """In the trial, before exec: SIGTERM when the runner dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG).
    The fork inherited the runner's SIGTERM handler, which would swallow a SIGTERM that came before exec: the
    default action first. A runner that died before prctl sends nothing: then the trial ends here."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError, ValueError):  # ValueError: launched from a thread other than the main one
        return
    if os.getppid() != runner_pid:  # the runner was killed during the fork: nobody will wait for this trial
        os._exit(128 + signal.SIGTERM)


@dataclass
class RunnerSettings:
    """How the runner runs a sweep's trials: sweep.py's --count, --workers, --max_failures, --gpus, --seed,
    --kill_delay."""
    count: int | None  # trials in all (None: every grid point)
    workers: int  # trials at once
    max_failures: int  # trials failed in a row that end the sweep
    gpus: list[str]  # one per worker (CUDA_VISIBLE_DEVICES); [] = none set
    seed: int  # the search's seed
    poll: float = 1.0  # seconds between looks at the trials
    kill_delay: float = 30.0  # seconds from a trial's SIGTERM to its SIGKILL


class Runner:
    def __init__(self, sweep: dict, sdir: SweepDir, info: dict, settings: RunnerSettings):
        self.sweep, self.dir, self.info, s = sweep, sdir, info, settings
        self.count, self.workers, self.max_failures, self.gpus = s.count, s.workers, s.max_failures, s.gpus
        self.seed, self.poll, self.kill_delay = s.seed, s.poll, s.kill_delay
        self.engine = sweeps_engine()
        self.trials = {t.id: t for t in sdir.trials()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.stop_sent: dict[str, float] = {}
        self.exhausted = False
        self.ended_files: dict[str, tuple] = {}  # trial id -> (history, summary) of a trial that ended

    # --- engine view
    def engine_runs(self) -> list:
        runs = []
        for t in self.trials.values():
            if t.state not in DONE:
                history, summary = read_local(self.dir.out_dir(t))
            else:  # polled every second: an ended trial's files are read once
                if t.id not in self.ended_files:
                    self.ended_files[t.id] = read_local(self.dir.out_dir(t))
                history, summary = self.ended_files[t.id]
            runs.append(self.engine.SweepRun(name=t.id, state=ENGINE_STATE[t.state], history=history,
                                             summary_metrics=summary,
                                             config={k: {"value": v} for k, v in t.params.items()}))
        return runs

    def propose(self) -> Trial | None:
        number = len(self.trials) + 1
        random.seed(self.seed * 100_003 + number)  # random search draws from `random`, bayes from np.random
        np.random.seed((self.seed * 100_003 + number) % 2**32)
        proposal = self.engine.next_run(self.sweep, self.engine_runs())
        if proposal is None:  # a grid with every point tried
            self.exhausted = True
            return None
        params = {k: plain(v["value"]) for k, v in proposal.config.items()}
        return Trial(random_id(), number, params)

    def next_trial(self) -> Trial | None:
        for t in self.trials.values():
            if t.state == "interrupted":
                return t
        if self.exhausted or (self.count is not None and len(self.trials) >= self.count):
            return None
        return self.propose()

    # --- processes
    def launch(self, trial: Trial) -> None:
        out_dir = self.dir.out_dir(trial)
        if out_dir.exists() and not (out_dir / RESUME_FILE).is_file():  # interrupted before its first epoch ended:
            aside = self.dir.root / "interrupted" / f"{trial.id}-attempt{trial.attempts}"  # keep it aside, start afresh
            aside.parent.mkdir(exist_ok=True)
            shutil.move(str(out_dir), str(aside))
        trial.attempts += 1
        trial.pid, trial.state, trial.started, trial.exit_code, trial.ended = None, "running", time.time(), None, None
        self.trials[trial.id] = trial
        self.dir.save(trial)  # recorded before it starts: a runner killed right now still knows it
        param_path = (self.dir.trials_dir / f"{trial.id}.yaml").resolve()
        param_path.write_text(param_file_text(trial.params))
        args_json = (self.dir.trials_dir / f"{trial.id}.args.json").resolve()
        argv = agent_command(self.sweep, trial.params, str(args_json))
        if "${args_json_file}" in map(str, self.sweep.get("command") or []):
            args_json.write_text(json.dumps(trial.params))
        env = {**os.environ, "WANDB_RUN_ID": trial.id, "WANDB_SWEEP_PARAM_PATH": str(param_path),
               "WANDB_RUN_GROUP": f"sweep-{self.info['id']}",
               "WANDB_TAGS": f"sweep-{self.info['id']},{self.info['name']}",
               "SWEEPCLS_RUNS_DIR": str(self.dir.runs_dir.resolve()),
               # `python` resolves as under the agent in this venv: the interpreter running sweep.py comes first
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        env.setdefault("WANDB_MODE", "offline")
        if self.sweep.get("project"):  # as `wandb agent` does: the trials go to the sweep's project
            env["WANDB_PROJECT"] = self.sweep["project"]
        # W trials share the cores: one OpenMP pool per core each, or they spin against each other (10x slower)
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // self.workers)))
        if self.gpus:
            busy = [t.gpu for t in self.trials.values() if t.state in LIVE and t.id != trial.id]
            trial.gpu = min(self.gpus, key=busy.count)
            env["CUDA_VISIBLE_DEVICES"] = trial.gpu
        with open(self.dir.log_path(trial), "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True,  # a terminal's Ctrl-C reaches the runner only; it forwards
                                    preexec_fn=functools.partial(_die_with_parent, os.getpid())
                                    if sys.platform.startswith("linux") else None)
        self.procs[trial.id] = proc
        trial.pid = proc.pid
        self.dir.save(trial)
        varied = " ".join(f"{k}={short(trial.params[k])}" for k in varied_keys(self.sweep) if k in trial.params)
        print(f"[{_now()}] trial {trial.number}{'/' + str(self.count) if self.count else ''} {trial.id} "
              f"{'restarted' if trial.attempts > 1 else 'started'}: {varied}", flush=True)

    def reap(self) -> None:
        for trial_id, proc in list(self.procs.items()):
            trial = self.trials[trial_id]
            code = proc.poll()
            if code is None:
                if trial_id in self.stop_sent and time.time() - self.stop_sent[trial_id] > self.kill_delay:
                    proc.kill()
                continue
            del self.procs[trial_id]
            self.stop_sent.pop(trial_id, None)
            trial.exit_code, trial.ended = code, time.time()
            trial.state = _ended(trial, code, "failed")
            self.dir.save(trial)
            print(f"[{_now()}] trial {trial.number} {trial.id} {trial.state}: {self.describe(trial)}", flush=True)
            write_leaderboard(self.sweep, self.dir)

    def describe(self, trial: Trial) -> str:
        _, summary = read_local(self.dir.out_dir(trial))
        metric = (self.sweep.get("metric") or {}).get("name")
        if trial.state == "failed":
            lines = self.dir.log_path(trial).read_text(errors="replace").strip().splitlines() or ["(no output)"]
            last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1])
            return f"exit code {trial.exit_code}: {last.strip()[:300]} (log: {self.dir.log_path(trial)})"
        return f"{metric} {short(summary.get(metric, 'n/a'))}" if metric else f"exit code {trial.exit_code}"

    def early_terminate(self) -> None:
        if "early_terminate" not in self.sweep or not any(t.state == "running" for t in self.trials.values()):
            return
        for run in self.engine.stop_runs(self.sweep, self.engine_runs()):
            trial = self.trials[run.name]
            if trial.state == "running" and trial.id in self.procs:
                trial.state = "stopping"
                self.stop_sent[trial.id] = time.time()
                self.dir.save(trial)
                self.procs[trial.id].terminate()  # train.py saves, finishes its W&B run and exits
                print(f"[{_now()}] hyperband stops trial {trial.number} {trial.id}", flush=True)

    def failure_streak(self) -> int:
        ended = sorted((t for t in self.trials.values() if t.state in DONE), key=lambda t: t.ended or 0)
        streak = 0
        for t in reversed(ended):
            if t.state != "failed":
                break
            streak += 1
        return streak

    def recover(self) -> None:
        """Trials a killed runner left behind: wait for their processes (the kernel sent them SIGTERM when
        the runner died), then keep what finished and relaunch what did not."""
        for trial in self.trials.values():
            if trial.state not in LIVE:
                continue
            deadline = time.time() + self.kill_delay
            while trial.pid and _trial_alive(trial.pid, trial.id):
                if time.time() > deadline:
                    os.kill(trial.pid, signal.SIGKILL)
                time.sleep(0.2)
            code = read_local(self.dir.out_dir(trial))[1].get("_exit_code")
            trial.exit_code, trial.ended = code, time.time()
            trial.state = _ended(trial, code, "interrupted")
            self.dir.save(trial)

    def shutdown(self, reason: str) -> None:
        print(f"[{_now()}] {reason}: stopping {len(self.procs)} running trial(s)", flush=True)
        for proc in self.procs.values():
            proc.terminate()
        deadline = time.time() + self.kill_delay
        for trial_id, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            trial = self.trials[trial_id]
            trial.exit_code, trial.ended = proc.returncode, time.time()
            trial.state = _ended(trial, proc.returncode, "interrupted")
            self.dir.save(trial)
        self.procs = {}

    def run(self) -> int:
        self.recover()
        with StopSignal() as stop:
            while True:
                if stop.requested:
                    self.shutdown(f"{signal.Signals(stop.signum).name}; rerun the same command to continue")
                    return 128 + stop.signum
                self.reap()
                if self.failure_streak() >= self.max_failures:
                    self.shutdown(f"{self.max_failures} trials failed in a row; see the logs in {self.dir.trials_dir}. "
                                  f"Stopping the sweep")
                    return 1
                self.early_terminate()
                while len(self.procs) < self.workers and (trial := self.next_trial()) is not None:
                    self.launch(trial)
                if not self.procs:
                    return 0
                time.sleep(self.poll)
