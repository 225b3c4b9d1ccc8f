"""Seconds from a stop signal to the process's exit, in each phase of a run (docs/stops-and-resume.md).

Usage (from the repository root; about 2 minutes on 2 CPU cores):
    python benchmarks/stop_phases.py                        # every phase below
    python benchmarks/stop_phases.py --phases validation "test prediction"
    python benchmarks/stop_phases.py --root /tmp/old        # another checkout of the repo, the same runs
Each run is train.py on the digits demo (--epochs 2, W&B offline), or for the decode on the digits written as 1,797
files of 256 px (--img_size 224 --cache disk), patched to send itself SIGTERM at a chosen call (the tests'
self_stop); the run writes the signal's time.monotonic() to a file and this script takes the exit's.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_stop_phases import self_stop  # noqa: E402

from conftest import as_main  # noqa: E402 - the tests' patches, so the figures measure what they test

DIGITS = ["--epochs", "2", "--wandb_mode", "offline"]
PHASES = [  # name, the call that sends the signal (module:function), its n-th call, flags (FILES: the image files)
    ("decoding images", "datasets.cache:load_image", 300, "FILES"),
    ("noisy validation copies", "datasets.corruption:noisy_copies", 1, DIGITS),
    ("training, mid-epoch", "optim.stepper:Stepper.step", 5, DIGITS),
    ("validation", "workflows.inference:to_input", 2, DIGITS),
    ("validation with --tta d4", "workflows.inference:to_input", 2, DIGITS + ["--tta", "d4"]),
    ("test prediction", "workflows.training:load_model", 1, DIGITS),
    ("report writing (writer thread)", "workflows.report:write_report", 1, DIGITS),
    ("checkpoint writing (writer thread)", "models.checkpoint:checkpoint_bytes", 1, DIGITS),
]


def measure(root: Path, work: Path, at: str, n: int, flags: list[str]) -> tuple[float | None, int, str]:
    """(seconds from the signal to the exit or None when no signal was sent, exit code, the last 'stopped' line)."""
    mark, out = work / "signal-time", work / "run"
    shutil.rmtree(out, ignore_errors=True)
    mark.unlink(missing_ok=True)
    patch = self_stop(at, n).replace("os.kill(os.getpid(), signal.SIGTERM)",
                                     f"open({str(mark)!r}, 'w').write(repr(__import__('time').monotonic())); "
                                     "os.kill(os.getpid(), signal.SIGTERM)")
    proc = subprocess.run([sys.executable, "-c", as_main(patch), *flags, "--out_dir", str(out)], cwd=root,
                          capture_output=True, text=True)
    end = time.monotonic()
    sent = float(mark.read_text()) if mark.is_file() else None
    last = [line for line in proc.stderr.splitlines() if line.startswith("stopped by")]
    return (None if sent is None else end - sent), proc.returncode, (last[-1] if last else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose train.py runs")
    parser.add_argument("--phases", nargs="*", default=[], help="only the phases whose name contains one of these")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = ["--data", str(work / "digits256"), "--img_size", "224", "--epochs", "1", "--wandb_mode", "offline",
                 "--cache", "disk", "--cache_dir", str(work / "cache")]
        subprocess.run([sys.executable, "-m", "datasets.digits", "--export", str(work / "digits256"), "--size", "256"],
                       cwd=ROOT, check=True, capture_output=True)
        os.environ["SWEEPCLS_CACHE_DIR"] = str(work / "cache")
        print("| where the stop lands | signal to exit | exit code | the run's last line |\n|---|---|---|---|")
        for name, at, n, flags in PHASES:
            if args.phases and not any(p in name for p in args.phases):
                continue
            took, code, last = measure(args.root, work, at, n, files if flags == "FILES" else flags)
            print(f"| {name} | {'no signal sent' if took is None else f'{took:.2f} s'} | {code} | {last[:90]} |",
                  flush=True)


if __name__ == "__main__":
    main()
