"""SIGTERM, SIGINT and SIGUSR1 (a cluster preempting, a hyperband stop, Ctrl-C, a scheduler's explicit preemption
notice such as SLURM's --signal=USR1@120) and W&B's own stop request (the UI's stop button, a sweep's early
termination: `StopSignal.request`, wandb's stop_fn) as a flag the training loop checks between steps, so a run
stops at a step boundary, saves, finishes its W&B run and exits.

Usage:
    with StopSignal() as stop:
        for batch in loader:
            ...; stop.check()          # raises Stopped once a signal has arrived
After a SIGTERM, or under `wandb agent`, the run has until Stopped.deadline (stop_budget_s() after the stop) to
save, finish its W&B run and exit.
Phases outside the training loop (decoding images, the shift measure, validation, TTA, test prediction) call
check_stop() between images or batches, which checks the StopSignal that is active in this process, so a stop is
honoured within a batch wherever the run is, without every function taking the StopSignal along.
Later signals while stopping are noted on stderr, never raised: `wandb agent` sends SIGTERM and its run's stop
poller SIGINT, and an exception raised there could land inside a checkpoint write or the W&B run's finish.
SIGKILL (or Ctrl-\\, SIGQUIT) still ends a run at once; resume continues from its last saved state.
"""
import os
import signal
import threading
import time


def stop_budget_s() -> float:
    """Seconds a run gives itself from a stop signal to its exit: `wandb agent` SIGKILLs a trial
    WANDB_AGENT_KILL_DELAY (default 30) seconds after its SIGTERM, as SLURM does after KillWait (default 30);
    10 s of that are left as a margin."""
    try:
        delay = float(os.environ.get("WANDB_AGENT_KILL_DELAY") or 30)
    except ValueError:
        delay = 30.0
    return max(5.0, delay - 10)


def _stop_name(signum: int, by_wandb: bool) -> str:
    return "W&B's stop request" if by_wandb else signal.Signals(signum).name


class Stopped(Exception):
    """A stop arrived; `signum` says which signal (SIGINT for W&B's own stop request, as wandb would send),
    `exit_code` is the shell's 128 + signum, `by_wandb` whether W&B asked for it, `at` when (time.monotonic)."""

    def __init__(self, signum: int, by_wandb: bool = False, at: float | None = None, phase: str = ""):
        self.signum = signum
        self.phase = phase  # what the run was doing: "training", "validation", "decoding images", ...
        self.exit_code = 128 + signum
        self.by_wandb = by_wandb
        self.at = time.monotonic() if at is None else at
        super().__init__(_stop_name(signum, by_wandb))

    @property
    def deadline(self) -> float | None:
        """time.monotonic() by which the run must have exited, before the SIGKILL that follows a SIGTERM (a cluster's,
        the agent's) or anything under `wandb agent`; None after a SIGINT elsewhere (Ctrl-C in a terminal, a
        notebook's interrupt), which nothing follows: the run then finishes however long W&B takes."""
        if self.signum in (signal.SIGTERM, signal.SIGUSR1) or os.environ.get("WANDB_SWEEP_ID"):
            return self.at + stop_budget_s()
        return None


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: a preemption, said so (tracking: on_stop)

    def __init__(self):
        self.signum: int | None = None
        self.by_wandb = False
        self.at: float | None = None  # time.monotonic() of the first stop
        self.phase_checks = True  # False under torchrun: a rank leaving a collective alone would hang the others
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # os.write: no buffered I/O inside a signal handler
            os.write(2, f"{signal.Signals(signum).name} noted: already stopping after "
                        f"{_stop_name(self.signum, self.by_wandb)} (saving, then finishing the W&B run)\n".encode())
            return
        self.at, self.signum = time.monotonic(), signum

    def request(self) -> None:
        """W&B says the run should stop (wandb's stop_fn, called on one of its threads): a stop like SIGINT, which
        is what wandb itself would send, but known to come from W&B (not a preemption)."""
        if self.signum is None:
            self.at, self.by_wandb, self.signum = time.monotonic(), True, signal.SIGINT

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        _active.remove(self)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, agree=None, phase: str = "training") -> None:
        """agree(flag) -> flag on every process (utils.distributed.any_rank): all ranks stop at one step."""
        flag = self.signum is not None
        if agree is not None:
            flag = agree(flag)
        if flag:
            raise Stopped(self.signum or signal.SIGTERM, self.by_wandb, self.at, phase)


_active: list[StopSignal] = []  # the StopSignals entered in this process, innermost last


def stop_requested() -> bool:
    """Whether the active StopSignal (if any, and if it checks phases) has a stop; safe on any thread."""
    stop = _active[-1] if _active else None
    return stop is not None and stop.phase_checks and stop.requested


def check_stop(phase: str) -> None:
    """Raise Stopped (naming `phase`) when the active StopSignal has a stop: for loops outside the training loop."""
    if stop_requested():
        _active[-1].check(phase=phase)


def ignore_later_stops() -> None:
    """For a command whose run has stopped and is now exiting: a stop signal from here on (the agent's SIGINT a
    second after its SIGTERM) is ignored, not a KeyboardInterrupt, nor (once Python's shutdown has reset its
    handlers) a death by that signal, either of which would replace the exit code the W&B run recorded. SIG_IGN,
    unlike a Python handler, outlasts the interpreter's shutdown (a second or two here: torch, wandb's service)."""
    for s in StopSignal.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
