"""Benchmarks that print figures (no pass/fail). Usage:
    python bench.py --model resnet18 --img_size 64 --batch_size 64 [--steps 20] [--device auto]
    python bench.py --pipeline [--data digits|PATH] [--cache auto|ram|disk|none] [--workers -1] [--epochs 6]

Default: the cost of one optimizer step (forward + backward + update on an in-memory batch) for the
training options that change it: plain, SAM, ASAM, EMA, SAM + EMA, and 2-step accumulation.
--pipeline: whether training runs at the model's speed or the loader's: (a) train.py's step over
real batches from its loader (its cache, workers, sampler and augmentation), (b) the same step on
one in-memory batch (the ceiling), (c) a/b, (d) train.py's epoch time with W&B offline and
disabled, and their ratio, (e) the loader alone. On CUDA with AMP and channels_last, as train.py.
For a folder of real image files: python -m datasets.digits --export /tmp/digits-jpg --size 256
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from utils import UserError, report_error
from utils.device import pick_device
from workflows.bench import pipeline_figures, step_costs
from workflows.flags import HelpFormatter, add_config_flags

ROOT = Path(__file__).resolve().parent


def wandb_epoch_seconds(model_name: str, img_size: int, batch_size: int, epochs: int, data_source: str,
                        workers: int, cache: str = "auto") -> dict:
    """(d) what one more epoch of train.py costs with W&B offline and with W&B disabled, end to end: the wall time
    of a run of `epochs` epochs minus that of a 2-epoch run, over epochs - 2. Start-up and the run's end cancel
    out; everything an epoch adds stays in (training, validation, tables, images and checkpoints at new bests,
    W&B's own threads and process, and background work that spills over into the run's end). The pairs run
    disabled, offline, offline, disabled, so a drift in the machine's speed hits both modes alike."""
    if epochs <= 2:
        raise SystemExit("error: --epochs must be more than 2 for (d): it compares a run of --epochs with one of 2")
    out = {"disabled": [], "offline": []}
    for mode in ("disabled", "offline", "offline", "disabled"):
        wall = {}
        for n in (2, epochs):
            with tempfile.TemporaryDirectory() as tmp:
                args = ["--model", model_name, "--img_size", str(img_size), "--batch_size", str(batch_size),
                        "--epochs", str(n), "--data", data_source, "--workers", str(workers), "--wandb_mode", mode,
                        "--out_dir", f"{tmp}/run", "--resume", "", "--cache", cache, "--pretrained", "false"]
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True,
                                      text=True, env={**os.environ, "WANDB_SILENT": "true"})
                wall[n] = time.perf_counter() - start
                if proc.returncode:  # train.py's own log is not the benchmark's figures, unless it failed
                    raise SystemExit(f"train.py {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
        out[mode].append((wall[epochs] - wall[2]) / (epochs - 2))
    return {mode: statistics.mean(seconds) for mode, seconds in out.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--pipeline", action="store_true", help="loader vs model: figures (a)-(e)")
    # a model and a size to time, not ones decided from the data (auto); --epochs: each train.py run of (d)
    add_config_flags(parser, "device", "data", "workers", "cache", model="resnet18", img_size=64, batch_size=64,
                     epochs=6)
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except UserError as e:
        raise SystemExit(report_error(e)) from None
    if args.pipeline:
        f = pipeline_figures(args.model, args.img_size, args.batch_size, args.steps, device, args.data, args.workers,
                             args.cache)
        print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, {device} ({torch.get_num_threads()} "
              f"threads), {args.data}, cache {args.cache} (ready in {f['prepare_seconds']:.1f} s), {f['workers']} "
              f"loader workers, {args.steps} steps")
        print(f"(a) training over the real loader   {f['train_real']:8.0f} img/s")
        print(f"(b) training on one in-memory batch {f['train_ceiling']:8.0f} img/s  (the ceiling)")
        print(f"(c) a / b                           {f['ratio']:8.2f}")
        print(f"(e) the loader alone                {f['loader']:8.0f} img/s")
        w = wandb_epoch_seconds(args.model, args.img_size, args.batch_size, args.epochs, args.data, args.workers,
                                args.cache)
        print(f"(d) one more epoch (--epochs {args.epochs} vs 2, end to end) with W&B offline {w['offline']:.2f} s, "
              f"disabled {w['disabled']:.2f} s, ratio {w['offline'] / w['disabled']:.3f}")
        return
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, {device} "
          f"({torch.get_num_threads()} threads), median of {args.steps} steps")
    print(f"{'variant':<22}{'ms/step':>10}{'x plain':>9}{'img/s':>9}")
    for name, ms, ratio, ips in step_costs(args.model, args.img_size, args.batch_size, args.steps, device):
        print(f"{name:<22}{ms:>10.1f}{ratio:>9.2f}{'-' if ips != ips else f'{ips:.0f}':>9}")


if __name__ == "__main__":
    main()
