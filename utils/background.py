"""One background thread that runs submitted calls in order, so slow I/O (W&B logging, checkpoint
files) overlaps training instead of pausing it.

Usage:
    writer = BackgroundWriter("checkpoint-writer")
    writer.submit(lambda: write(path, snapshot))   # returns at once (waits only when `backlog` are queued)
    writer.drain()                                 # every call so far has run; raises the first failure
    writer.close()                                 # drain, then stop the thread
    answer = answer_within(lambda: ask_server(), timeout=5, name="probe", default=None)   # a bounded wait
A call that raises is not lost: the exception is raised, once, by the next submit/drain/close on the
caller's thread; calls queued behind the failure are dropped.
"""
import queue
import threading


class BackgroundWriter:
    def __init__(self, name: str, backlog: int = 16):
        self.queue: queue.Queue = queue.Queue(backlog)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (fn := self.queue.get()) is not None:
            try:
                if self.error is None:
                    fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self.error = e
            finally:
                self.queue.task_done()

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, fn) -> None:
        self.raise_error()
        self.queue.put(fn)

    def drain(self) -> None:
        self.queue.join()
        self.raise_error()

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.raise_error()


def answer_within(fn, timeout: float, name: str, default=None):
    """fn() on a daemon thread: what it returns, or `default` when it raises or has not returned within timeout
    seconds (a network call with no time-out of its own, a name lookup, is left to end on its own)."""
    answer = []

    def run():
        try:
            answer.append(fn())
        except Exception:  # noqa: BLE001 - any failure is "no answer"
            answer.append(default)
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else default
