"""Shared fixtures: every W&B directory in a temp path, real offline mode; small real image folders."""
import contextlib
import csv
import functools
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY_MODEL = "test_resnet"  # a real timm architecture with ~0.4M parameters, random init


SHARED_CACHE: list[Path] = []  # set once per session by shared_cache_dir
# pytest -n N (xdist): the cores shared out among the N workers, in this process and the commands it starts, so that
# N torch thread pools do not spin against each other (the sweep runner's own test sets its variable itself)
THREADS = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def isolated_env(root: Path) -> dict[str, str]:
    """The environment every test runs in: W&B in real offline mode with all its folders under root, no key or
    sweep of the machine's, and no weights but a test's own (no download). sweepcls' cache folder (decoded images,
    the shift measure, predictions) is one per session: what it holds is keyed by content, so a test reuses what an
    earlier one computed on the same images; a test about the cache itself passes its own --cache_dir."""
    env = {"OMP_NUM_THREADS": THREADS, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "NETRC": str(root / "no-netrc"),
           "SWEEPCLS_CACHE_DIR": str(SHARED_CACHE[0] if SHARED_CACHE else root / "image-cache"),
           "HF_HUB_OFFLINE": "1",  # --pretrained auto: never a download in a test
           "SWEEPCLS_WEIGHTS_DIR": str(root / "weights")}  # ... and no weights but a test's own
    for key, sub in [("WANDB_DIR", "dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config")]:
        (root / "wandb-home" / sub).mkdir(parents=True, exist_ok=True)
        env[key] = str(root / "wandb-home" / sub)
    return env


UNSET = ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_PROJECT")


@pytest.fixture(scope="session", autouse=True)
def shared_cache_dir(tmp_path_factory):
    import torch
    torch.set_num_threads(int(THREADS))
    SHARED_CACHE[:] = [tmp_path_factory.mktemp("sweepcls-cache")]
    return SHARED_CACHE[0]


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    for key in UNSET:
        monkeypatch.delenv(key, raising=False)
    for key, value in isolated_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return tmp_path / "wandb-home"


def as_main(patch: str) -> str:
    """Python code that applies `patch`, then runs train.py as `python train.py` would (its __main__ block)."""
    return f"{patch}\nimport runpy, sys; sys.argv[0] = 'train.py'; runpy.run_path('train.py', run_name='__main__')"


def wait_for_epochs(proc, out_dir: Path, n: int, timeout: float = 180) -> None:
    """Until out_dir/metrics.jsonl has n epoch rows; the process ending first, or the timeout, fails the test."""
    deadline = time.time() + timeout
    metrics = out_dir / "metrics.jsonl"
    while not metrics.exists() or sum(1 for line in metrics.read_text().splitlines() if '"epoch"' in line) < n:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        assert time.time() < deadline, "no epoch logged in time"
        time.sleep(0.1)


def _digit_images(n: int, seed: int = 0):
    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(digits.target), size=n, replace=False)
    images = [cv2.resize((digits.images[i] * 255 / 16).astype(np.uint8), (32, 32)) for i in idx]
    return images, digits.target[idx]


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_competition_folder(root: Path, n_train=240, n_test=40, name_labels=False, with_meta=True, groups=False):
    """train.csv (ID,target[,group]) + train/ + meta.csv + sample_submission.csv + test/, from real digits."""
    images, labels = _digit_images(n_train + n_test)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "target"] + (["group"] if groups else []))
        for i in range(n_train):
            cv2.imwrite(str(root / "train" / f"tr_{i:04d}.png"), images[i])
            label = NAMES[labels[i]] if name_labels else int(labels[i])
            w.writerow([f"tr_{i:04d}.png", label] + ([f"person{i // 6}"] if groups else []))
    if with_meta:
        with open(root / "meta.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["target", "class_name"]] + [[i, n] for i, n in enumerate(NAMES)])
    test_ids = [f"te_{i:04d}.png" for i in range(n_test)]
    for i, tid in enumerate(test_ids):
        cv2.imwrite(str(root / "test" / tid), images[n_train + i])
    order = np.random.default_rng(1).permutation(n_test)  # not sorted: the submission must keep this order
    with open(root / "sample_submission.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["ID", "target"]] + [[test_ids[i], 0] for i in order])
    return root


@pytest.fixture
def competition(tmp_path):
    return make_competition_folder(tmp_path / "comp")


def read_run(run_dir: Path) -> list[dict]:
    """All records of an offline run, read with wandb's own reader: `wandb leet inspect --json RUN_DIR`, which hands
    the run's .wandb file to wandb-core's `leet inspect`; called here directly, without the Python start-up (~1 s)."""
    from wandb.util import get_core_path
    run_file = next(Path(run_dir).glob("run-*.wandb"))
    out = subprocess.run([get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file",
                          str(run_file), str(Path(run_dir).parent)], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def attempts_history(run_dir: Path) -> list[list[dict]]:
    """The W&B history rows of each attempt of one run (out_dir/wandb/offline-run-*, in order), checked to line up:
    every epoch row and step row has one W&B step, the same in each attempt that logged it, and each attempt's
    steps rise, so the attempts merge without conflict when synced."""
    parts = [[r["history"]["item"] for r in read_run(p) if r["type"] == "history"]
             for p in sorted(Path(run_dir).glob("wandb/offline-run-*"))]
    at = {}
    for rows in parts:
        steps = [h["_step"] for h in rows]
        assert steps == sorted(set(steps)), steps
        for h in rows:
            key = ("epoch", h["epoch"]) if "epoch" in h else ("step", h["global_step"]) if "global_step" in h else None
            assert key is None or at.setdefault(key, h["_step"]) == h["_step"], (key, h["_step"], at)
    return parts


def _abandon_in_process(run, exit_code: int, why: str) -> None:
    """utils.tracking.ending.abandon inside run_script: it would os._exit this process (pytest) with the run's code,
    so a stopped run whose W&B finish outlasted its deadline fails its test instead."""
    raise AssertionError(f"the run would end the pytest process here (ending.abandon, exit code {exit_code}): {why}")


def stop_at(patch: pytest.MonkeyPatch, at: str, n: int, sig: int = signal.SIGTERM) -> list[int]:
    """Patches `at` (module:name or module:Class.name, a function) to send this process `sig` on its n-th call, for
    a run in this process (until `patch` is undone); returns the count of calls so far (a list of one)."""
    module, name = at.split(":")
    *path, name = name.split(".")
    owner = importlib.import_module(module)
    for part in path:
        owner = getattr(owner, part)
    f, calls = getattr(owner, name), [0]

    @functools.wraps(f)
    def g(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), sig)
        return f(*a, **k)
    patch.setattr(owner, name, g)
    return calls


def run_script(name: str, args: list[str], cwd=ROOT) -> subprocess.CompletedProcess:
    """`python NAME.py ARGS` run in this process through NAME.main (the imports are paid once per session, not once
    per command): its exit code, stdout and stderr as a finished process would give them. An uncaught exception
    propagates to the test (a process would print its traceback and exit 1). A stop signal this process sends
    itself is handled by the run's StopSignal; the handlers of the stop signals are restored after, and an exit
    that would end the process (ending.abandon) fails the test instead. A test about the process itself (signals
    from outside, kills, torchrun, the agent, a fresh import) starts a real one instead."""
    import wandb

    from utils.stop import StopSignal
    from utils.tracking import ending
    main = importlib.import_module(name).main
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    before, argv, program = os.getcwd(), sys.argv, os.environ.get("WANDB_PROGRAM")
    handlers = {s: signal.getsignal(s) for s in StopSignal.SIGNALS}  # a stopped run's main may leave them changed
    abandon, ending.abandon = ending.abandon, _abandon_in_process
    os.chdir(cwd)
    sys.argv, os.environ["WANDB_PROGRAM"] = [f"{name}.py", *args], f"{name}.py"  # W&B saves and names the script
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse: 2 and its usage on stderr; SystemExit("text"): the text, 1
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        for s, handler in handlers.items():  # this process must not go on ignoring a stop (ignore_later_stops)
            signal.signal(s, handler)
        ending.abandon = abandon
        os.chdir(before)
        sys.argv = argv
        if program is None:
            os.environ.pop("WANDB_PROGRAM")
        else:
            os.environ["WANDB_PROGRAM"] = program
        wandb.teardown()  # the next run's wandb.setup reads this test's environment, not the first one's
    return subprocess.CompletedProcess([f"{name}.py", *args], code, out.getvalue(), err.getvalue())


def run_train(args: list[str], cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    """`python train.py ARGS`, in this process (run_script); check: a non-zero exit fails the test. The final fit (on
    by default where there is a test set) would double every run: it is off unless a test passes --final_fit."""
    args = args if any(str(a).startswith("--final_fit") for a in args) else [*args, "--final_fit=false"]
    proc = run_script("train", args, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
