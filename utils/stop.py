"""SIGTERM and SIGINT (a cluster preempting, a hyperband stop, Ctrl-C) as a flag the training loop
checks between steps, so a run stops at a step boundary, saves, finishes its W&B run and exits.

Usage:
    with StopSignal() as stop:
        for batch in loader:
            ...; stop.check()          # raises Stopped once a signal has arrived
Later signals while stopping are noted on stderr, never raised: `wandb agent` sends SIGTERM and its run's stop
poller SIGINT, and an exception raised there could land inside a checkpoint write or the W&B run's finish.
SIGKILL (or Ctrl-\\, SIGQUIT) still ends a run at once; resume continues from its last saved state.
"""
import os
import signal
import threading


class Stopped(Exception):
    """A stop signal arrived; `signum` says which, `exit_code` is the shell's 128 + signum."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal.Signals(signum).name)


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # os.write: no buffered I/O inside a signal handler
            os.write(2, f"{signal.Signals(signum).name} noted: already stopping after "
                        f"{signal.Signals(self.signum).name} (saving, then finishing the W&B run)\n".encode())
            return
        self.signum = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, agree=None) -> None:
        """agree(flag) -> flag on every process (utils.distributed.any_rank): all ranks stop at one step."""
        flag = self.signum is not None
        if agree is not None:
            flag = agree(flag)
        if flag:
            raise Stopped(self.signum or signal.SIGTERM)
