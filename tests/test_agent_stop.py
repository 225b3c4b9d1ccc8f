"""Stops under `wandb agent`, in the agent's own pattern: SIGTERM (the agent's stop, or a cluster's preemption), the
run's stop poller a second later (SIGINT), SIGKILL 30 s after the SIGTERM. A trial must save, finish its W&B run and
exit well inside those 30 s, and a preemption (a SIGTERM W&B did not ask for) must be marked so that W&B requeues
the trial, which then continues from its run folder. Real train.py and wandb offline; faked, thinly, only what a
server decides: its answer to "did W&B ask this run to stop?" and an upload that does not end."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb

from conftest import ROOT, TINY_MODEL, as_main, read_run, wait_for_epochs
from utils import tracking
from utils.runs import random_id
from utils.stop import Stopped, StopSignal, stop_budget_s

KILL_DELAY = 30  # wandb agent's SIGKILL after its SIGTERM (wandb_agent.Agent.KILL_DELAY)


def start_trial(competition, env: dict, *args, wrapper: str = "") -> subprocess.Popen:
    """train.py as `wandb agent` starts a trial: its own process group, WANDB_SWEEP_ID and WANDB_RUN_ID set, the
    run folder under SWEEPCLS_RUNS_DIR by run id (no --out_dir)."""
    cmd = [sys.executable, *(["-c", wrapper] if wrapper else ["train.py"]), "--data", str(competition),
           "--model", TINY_MODEL, "--img_size", "32", "--epochs", "40", "--workers", "0", "--batch_size", "16",
           "--final_fit", "false", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0)


def agent_env(tmp_path, run_id: str) -> dict:
    return {**os.environ, "WANDB_SWEEP_ID": "sweep1", "WANDB_RUN_ID": run_id,
            "SWEEPCLS_RUNS_DIR": str(tmp_path / "runs")}


def stop_like_the_agent(proc) -> tuple[float, str, str]:
    """SIGTERM; SIGINT a second later (the run's stop poller); SIGKILL at 30 s. Seconds from SIGTERM to exit."""
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    try:
        out, err = proc.communicate(timeout=1)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=KILL_DELAY - 1)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return time.monotonic() - sent, out, err


def stop_a_patched_trial(tmp_path, competition, run_id: str, patch: str, **env) -> tuple[Path, float, str, str]:
    """A trial of train.py with `patch` applied, stopped in the agent's pattern after its first epoch; it must exit
    with 128 + SIGTERM. Its run folder, the seconds from SIGTERM to exit, stdout, stderr."""
    proc = start_trial(competition, {**agent_env(tmp_path, run_id), **env}, wrapper=as_main(patch))
    out_dir = tmp_path / "runs" / run_id
    wait_for_epochs(proc, out_dir, 1)
    took, out, err = stop_like_the_agent(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    return out_dir, took, out, err


def wandb_records(out_dir: Path, attempt: int = 0) -> list[dict]:
    return read_run(sorted(out_dir.glob("wandb/offline-run-*"))[attempt])


def epochs_logged(out_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in rows if "epoch" in r and "val/loss" in r]


@pytest.mark.slow
def test_a_preempted_trial_is_marked_and_its_requeued_run_continues(tmp_path, competition):
    env = agent_env(tmp_path, "trial001")
    out_dir = tmp_path / "runs" / "trial001"
    proc = start_trial(competition, env)
    wait_for_epochs(proc, out_dir, 1)
    took, out, err = stop_like_the_agent(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert took < KILL_DELAY - 10, f"{took:.1f} s from SIGTERM to exit"
    assert "Traceback" not in err  # the SIGINT a second later, while stopping or exiting: no KeyboardInterrupt
    assert "preempted" in out and "W&B requeues this trial" in out
    records = wandb_records(out_dir)
    assert any(r["type"] == "preempting" for r in records)  # what W&B requeues on (run.mark_preempting)
    assert next(r for r in records if r["type"] == "exit")["exit"]["exit_code"] == 128 + signal.SIGTERM
    assert json.loads((out_dir / "summary.json").read_text())["preempted"] is True
    done = epochs_logged(out_dir)
    # W&B hands the requeued trial to an agent: the same command, the same run id, so the same run folder
    again = start_trial(competition, env)
    wait_for_epochs(again, out_dir, len(done) + 1)
    stop_like_the_agent(again)
    epochs = epochs_logged(out_dir)
    assert epochs[:len(done)] == done and epochs[len(done)] == done[-1] + 1  # continued, not started over
    assert len(list(out_dir.glob("wandb/offline-run-*"))) == 2  # two attempts of the one W&B run
    assert wandb_records(out_dir, 1)[1]["run"]["run_id"] == "trial001"


@pytest.mark.slow
def test_a_stop_ends_the_process_in_time_even_when_wandb_does_not_finish(tmp_path, competition):
    """An upload that outlasts the stop's time budget (a big model on a slow link: faked by a finish that never
    returns) must not run into the SIGKILL: the process says what is where and exits with the stop's code."""
    out_dir, took, out, err = stop_a_patched_trial(
        tmp_path, competition, "trial003", "import time, wandb; "
                                           "wandb.Run.finish = lambda self, *a, **k: time.sleep(3600)",
        WANDB_AGENT_KILL_DELAY="16")  # budget: 6 s
    assert took < 16, f"{took:.1f} s from SIGTERM to exit"
    assert "W&B is still uploading" in err and f"wandb sync {out_dir.resolve()}" in err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["_exit_code"] == 128 + signal.SIGTERM and summary["wandb_unfinished"] is True
    assert (out_dir / "resume.pt").is_file() and (out_dir / "last.safetensors").is_file()


def test_wandb_stop_request_reaches_the_run_as_a_stop_that_is_not_a_preemption(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    out_dir = tmp_path / "run"
    with StopSignal() as stop:
        run = tracking.init({"model": "m"}, random_id(), out_dir, "offline", stop_fn=stop.request)
        poller_stop = run.wandb._settings.stop_fn  # what wandb's RunStatusChecker is given, in place of its SIGINT
        poller = threading.Thread(target=poller_stop)  # as the poller calls it when W&B answers "stop"
        poller.start()
        poller.join()
        os.kill(os.getpid(), signal.SIGTERM)  # the agent's SIGTERM for the same stop: noted
        with pytest.raises(Stopped) as e:
            stop.check()
    assert e.value.by_wandb and e.value.exit_code == 128 + signal.SIGINT
    assert run.run_to_end(lambda: (_ for _ in ()).throw(e.value)) == 0  # a finished trial: no failure for the agent
    records = read_run(next(out_dir.glob("wandb/offline-run-*")))
    assert not any(r["type"] == "preempting" for r in records)


class StopStatusServer:
    """W&B's server as wandb.Api()'s GraphQL transport (api._service_api.execute_graphql) answers the run's stopped
    status: `stopped` (True, False), after `delay` seconds. The one thing faked: what a server decides."""

    def __init__(self, stopped: bool, delay: float = 0.0):
        self.stopped, self.delay, self.asked = stopped, delay, []

    def execute_graphql(self, query: str, variables: dict) -> dict:
        self.asked.append(variables)
        time.sleep(self.delay)
        return {"project": {"run": {"stopped": self.stopped}}}


def stop_under_the_agent(tmp_path, monkeypatch, server: StopStatusServer, signum=signal.SIGTERM):
    """A run under `wandb agent` stopped by `signum` (before W&B's own stop poller heard anything), as online as
    it can be here: an offline run that says it is online, so that the stop asks the server (faked). Its exit
    code, the W&B records written, summary.json."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    monkeypatch.setenv("WANDB_RUN_ID", "trial9")
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: SimpleNamespace(_service_api=server))
    out_dir = tmp_path / "run"
    run = tracking.init({"model": "m"}, "trial9", out_dir, "offline")
    monkeypatch.setattr(tracking.Run, "mode", property(lambda self: "online"))
    code = run.run_to_end(lambda: (_ for _ in ()).throw(Stopped(signum)))
    return code, read_run(next(out_dir.glob("wandb/offline-run-*"))), json.loads((out_dir / "summary.json").read_text())


def test_a_sweep_stop_the_server_confirms_after_the_sigterm_is_a_finished_trial(tmp_path, monkeypatch, capsys):
    """hyperband's stop: the agent's SIGTERM arrives before wandb-core's file stream says "stopped"; the server,
    asked now, says it stopped the run. Exit 0, or the agent counts a failure and requeues nothing useful."""
    server = StopStatusServer(stopped=True)
    code, records, summary = stop_under_the_agent(tmp_path, monkeypatch, server)
    assert code == 0 and summary["_exit_code"] == 0 and "stopped" in summary and "preempted" not in summary
    assert server.asked and server.asked[0]["runId"] == "trial9"
    assert not any(r["type"] == "preempting" for r in records)
    assert next(r for r in records if r["type"] == "exit")["exit"]["exit_code"] == 0
    assert "stopped by the sweep" in capsys.readouterr().out


def test_a_sigterm_the_server_did_not_ask_for_is_a_preemption(tmp_path, monkeypatch, capsys):
    code, records, summary = stop_under_the_agent(tmp_path, monkeypatch, StopStatusServer(stopped=False))
    assert code == 128 + signal.SIGTERM and summary["preempted"] is True
    assert any(r["type"] == "preempting" for r in records)
    assert "W&B requeues this trial" in capsys.readouterr().out


def test_no_answer_from_the_server_is_not_a_preemption_and_says_so(tmp_path, monkeypatch, capsys):
    """A requeued trial that W&B stops again would loop: without an answer the stop is assumed W&B's."""
    started = time.monotonic()
    code, records, summary = stop_under_the_agent(tmp_path, monkeypatch, StopStatusServer(stopped=False, delay=60))
    assert time.monotonic() - started < 30
    assert code == 0 and "preempted" not in summary
    assert not any(r["type"] == "preempting" for r in records)
    assert "did not say" in capsys.readouterr().out


def test_sigusr1_stops_a_run_with_a_deadline():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # its default action would end the process unsaved
        with pytest.raises(Stopped) as e:
            stop.check()
    assert e.value.signum == signal.SIGUSR1 and e.value.deadline is not None


def test_the_journal_calls_a_trial_wandb_stopped_stopped_though_it_exits_0():
    from workflows.journal import _state
    assert _state({"_exit_code": 0, "stopped": "SIGTERM during training"}) == "stopped"
    assert _state({"_exit_code": 0}) == "finished" and _state({"_exit_code": 143}) == "stopped"


def test_sigusr1_is_a_preemption_without_asking(tmp_path, monkeypatch, capsys):
    """A scheduler's explicit notice (SLURM --signal=USR1@120): requeued, and the server is not asked."""
    server = StopStatusServer(stopped=True)
    code, records, summary = stop_under_the_agent(tmp_path, monkeypatch, server, signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1 and summary["preempted"] is True and not server.asked
    assert any(r["type"] == "preempting" for r in records)


def test_a_stop_budget_follows_the_agents_kill_delay(monkeypatch):
    monkeypatch.delenv("WANDB_AGENT_KILL_DELAY", raising=False)
    assert stop_budget_s() == 20
    monkeypatch.setenv("WANDB_AGENT_KILL_DELAY", "120")
    assert stop_budget_s() == 110
    stopped = Stopped(signal.SIGTERM)
    assert stopped.deadline == pytest.approx(stopped.at + 110)
    assert Stopped(signal.SIGINT).deadline is None  # Ctrl-C in a terminal or a notebook: no SIGKILL follows
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    assert Stopped(signal.SIGINT).deadline is not None
