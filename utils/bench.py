"""Benchmarks that print figures (no pass/fail). Usage:
    python -m utils.bench --model resnet18 --img_size 64 --batch_size 64 [--steps 20] [--device auto]

Prints the cost of one optimizer step (forward + backward + update on an in-memory batch) for the
training options that change it: plain, SAM, ASAM, EMA, SAM + EMA, and 2-step accumulation.
"""
import argparse
import statistics
import time

import torch
from timm.utils import ModelEmaV3

from losses import build_loss
from models import build_model
from optim import SAM, build_optimizer, build_scheduler


def _timed(fn, device: torch.device) -> float:
    """Seconds one call of fn takes, with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_costs(model_name: str, img_size: int, batch_size: int, steps: int, device: torch.device) -> list[tuple]:
    from train import Stepper  # late: `python -m utils.bench --help` stays instant
    from utils.runtime import amp_dtype_for, to_input
    amp_dtype = amp_dtype_for(device, True)
    g = torch.Generator().manual_seed(0)
    x = to_input(torch.randn(batch_size, 3, img_size, img_size, generator=g), device)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)

    def stepper(sam=False, adaptive=False, ema=False) -> Stepper:
        torch.manual_seed(0)
        model = build_model(model_name, 10).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.05)
        return Stepper(model, build_loss("ce"), optimizer, build_scheduler("none", optimizer),
                       torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), device, amp_dtype,
                       SAM(optimizer, 0.05, adaptive) if sam else None,
                       ModelEmaV3(model, decay=0.999, use_warmup=True) if ema else None)

    half = batch_size // 2
    variants = [("plain", stepper(), [(x, y)]), ("SAM", stepper(sam=True), [(x, y)]),
                ("ASAM", stepper(sam=True, adaptive=True), [(x, y)]), ("EMA", stepper(ema=True), [(x, y)]),
                ("SAM + EMA", stepper(sam=True, ema=True), [(x, y)]),
                ("accum 2 x half batch", stepper(), [(x[:half], y[:half]), (x[half:], y[half:])])]
    # round robin: one step of each variant per round, so drift in the machine's speed hits all alike
    times = {name: [] for name, _, _ in variants}
    for round_ in range(steps + 2):
        for name, st, batches in variants:
            seconds = _timed(lambda: st.step(batches), device)
            if round_ >= 2:  # warm-up rounds
                times[name].append(seconds)
    ema = variants[3][1]
    # the EMA update by itself, which the step-to-step noise can hide
    times["EMA update alone"] = [_timed(lambda: ema.ema.update(ema.model, step=1000 + i), device) for i in range(steps)]
    base = statistics.median(times["plain"])
    return [(name, statistics.median(t) * 1000, statistics.median(t) / base,
             batch_size / statistics.median(t) if name != "EMA update alone" else float("nan"))
            for name, t in times.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, {device} "
          f"({torch.get_num_threads()} threads), median of {args.steps} steps")
    print(f"{'variant':<22}{'ms/step':>10}{'x plain':>9}{'img/s':>9}")
    for name, ms, ratio, ips in step_costs(args.model, args.img_size, args.batch_size, args.steps, device):
        print(f"{name:<22}{ms:>10.1f}{ratio:>9.2f}{'-' if ips != ips else f'{ips:.0f}':>9}")


if __name__ == "__main__":
    main()
