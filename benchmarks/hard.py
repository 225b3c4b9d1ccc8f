"""The hard benchmark's results table: each recipe over several seeds, test macro-F1 mean +- std and wall time.

Usage (from the repository root; about 40 s per 12-epoch run on 2 CPU cores):
    python benchmarks/hard.py                               # every recipe below, seeds 0 1 2, 12 epochs
    python benchmarks/hard.py --recipes defaults light --seeds 0
    python benchmarks/hard.py --sweep 8                     # + an 8-trial sweep.py run of sweep.yaml,
                                                            #   and its top-3 ensemble
    python benchmarks/hard.py --data documents              # the second benchmark: benchmarks/documents.py
Each sweepcls run is `python train.py --data digits_hard --epochs E --seed S` plus the recipe's flags, W&B disabled;
the reference loop (benchmarks/reference_loop.py) reads the same data exported as a competition folder. The
documents benchmark is such a folder: every run reads it, and its submissions are scored against its answers file.
"""
import argparse
import csv
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = {"data": "digits_hard", "folder": None, "answers": None}  # set by main: what --data every run gets, the
# competition folder (the reference loop's data) and its answers file
RECIPES = {  # name -> train.py flags on top of the defaults
    "defaults": [],
    "aug light": ["--aug_preset", "light"],
    "aug none": ["--aug_preset", "none"],
    "clean validation": ["--val_noise", "none"],
    "test-time BN": ["--test_bn", "adapt", "--tta", "none"],
    "TTA d4": ["--tta", "d4", "--test_bn", "none"],
    "TTA d4 + test-time BN": ["--tta", "d4", "--test_bn", "adapt"],
    "no test-time steps": ["--test_bn", "none", "--tta", "none"],  # the defaults are auto: decided from the measure
    "EMA": ["--ema", "True"],
    "AugMix 0.5": ["--augmix", "0.5"],
    "no final fit": ["--final_fit", "false"],  # the holdout model predicts the test set (the defaults: a final fit)
    "no final pseudo-labels": ["--final_pseudo", "0"],  # the defaults: the holdout model's confident test labels
    # in the final fit (--final_pseudo 0.3)
    "aug floor 0.2": ["--aug_floor", "0.2"],  # every photometric corruption the measure left off, on for 20 %
}
PSEUDO = {  # the defaults run's test probabilities added (p >= 0.9, and the share per class), trained again
    "pseudo-labels": [],  # the defaults: --pseudo_share 0.3
    "pseudo-labels, threshold alone": ["--pseudo_share", "0"],
    "pseudo-labels, class-balanced 60 %": ["--pseudo_share", "0.6"],
}
AVERAGED = {  # the defaults, keeping N epochs; then the fit that submits (the final fit) has its last N epochs'
    # weights averaged (avg_checkpoints.py) and predicted with the test-time steps its run chose
    "last 3 epochs averaged": 3,
}
PSEUDO_ROUND_SHARE = "0.3"  # --sweep: the pseudo-label round after the top-3 ensemble


def run(cmd: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - start


def test_f1(stdout: str, submission: Path | None = None) -> float:
    """The test macro-F1 a command printed (the digits know their test labels), else its submission's, scored."""
    found = re.findall(r"test/f1_macro ([0-9.]+)", stdout)
    if found:
        return float(found[-1])
    from datasets.digits import score
    return score(submission, BENCH["answers"])


VALIDATION = []  # each train() run's best val/f1_macro (noisy under --val_noise auto): how well it foretold the test


def train(out: Path, epochs: int, seed: int, flags: list[str]) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own scratch folder: a rerun measures afresh
    stdout, wall = run([sys.executable, "train.py", "--data", BENCH["data"], "--epochs", str(epochs),
                        "--seed", str(seed), "--wandb_mode", "disabled", "--resume", "", "--out_dir", str(out), *flags])
    summary = json.loads((out / "summary.json").read_text())
    VALIDATION.append(float(summary.get("val/f1_macro", "nan")))
    return test_f1(stdout, out / "submission.csv"), wall


def recipe(name: str, work: Path, epochs: int, seed: int) -> tuple[float, float]:
    if name in RECIPES:
        return train(work / f"{name.replace(' ', '_')}-{seed}", epochs, seed, RECIPES[name])
    first = work / f"defaults-{seed}"
    if not (first / "best.safetensors").is_file():
        train(first, epochs, seed, [])
    probs = work / f"probs-{seed}.csv"
    _, wall = run([sys.executable, "predict.py", str(first), "--data", BENCH["data"], "--out", str(work / "sub.csv"),
                   "--save_probs", str(probs), "--cache_dir", str(work / "cache")])
    f1, wall2 = train(work / f"{name.replace(' ', '_')}-{seed}", epochs, seed, ["--pseudo_labels", str(probs),
                                                                             *PSEUDO[name]])
    return f1, wall + wall2


def averaged(name: str, work: Path, epochs: int, seed: int) -> tuple[float, float]:
    """A defaults run keeping AVERAGED[name] epochs, its submitting fit's kept epochs averaged and predicted; the run's
    own test score is printed beside the averaged one (the same training: keep_top_k changes no weight)."""
    from models.checkpoint import read_meta
    out = work / f"{name.replace(' ', '_')}-{seed}"
    own, wall = train(out, epochs, seed, ["--keep_top_k", str(AVERAGED[name])])
    fit = out / "final" if (out / "final" / "best.safetensors").is_file() else out
    _, wall2 = run([sys.executable, "avg_checkpoints.py", str(fit), "--out", str(out / "averaged.safetensors")])
    decided = read_meta(fit / "best.safetensors").get("test_time") or {}
    stdout, wall3 = run([sys.executable, "predict.py", str(out / "averaged.safetensors"), "--data", BENCH["data"],
                         "--out", str(out / "averaged.csv"), "--cache_dir", str(work / "cache"),
                         "--tta", decided.get("tta", "auto"), "--test_bn", decided.get("test_bn", "auto")])
    f1 = test_f1(stdout, out / "averaged.csv")
    print(f"  seed {seed}: the run's own submission {own:.3f}, its {fit.name} fit's last {AVERAGED[name]} epochs "
          f"averaged {f1:.3f}", flush=True)
    return f1, wall + wall2 + wall3


def reference(work: Path, epochs: int, seed: int) -> tuple[float, float]:
    stdout, wall = run([sys.executable, "benchmarks/reference_loop.py", "--data", str(BENCH["folder"]), "--answers",
                        str(BENCH["answers"]), "--epochs", str(epochs), "--seed", str(seed),
                        "--out", str(work / "reference.csv")])
    return float(re.findall(r"test macro-F1 ([0-9.]+)", stdout)[-1]), wall


def sweep(work: Path, epochs: int, count: int) -> list[tuple[str, float, float]]:
    """count trials of sweep.yaml (data: the benchmark's, epochs fixed), then the top 3 ensembled on the test set
    (ensemble.py's default weights: fitted on the trials' shared noisy validation split)."""
    spec = yaml.safe_load((ROOT / "sweep.yaml").read_text())
    spec["parameters"] |= {"data": {"value": BENCH["data"]}, "epochs": {"value": epochs}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep_dir = work / "sweep"
    _, wall = run([sys.executable, "sweep.py", str(work / "sweep.yaml"), "--count", str(count),
                   "--sweep_dir", str(sweep_dir)])
    scores = [_trial_test(sweep_dir, log.stem) for log in sorted((sweep_dir / "trials").glob("*.log"))]
    scores = [s for s in scores if s is not None]  # trials that wrote a submission
    status, _ = run([sys.executable, "sweep.py", "--status", str(sweep_dir)])
    stdout, wall_ens = run([sys.executable, "ensemble.py", "--sweep", str(sweep_dir), "--top", "3",
                            "--data", BENCH["data"], "--out", str(work / "ensemble.csv"), "--wandb_mode", "disabled",
                            "--cache_dir", str(work / "cache"), "--save_probs", str(work / "ensemble-probs.csv")])
    ensemble = (float(next(line for line in stdout.splitlines() if line.startswith("ensemble ")).split()[-1])  # test
                if BENCH["data"] == "digits_hard" else test_f1("", work / "ensemble.csv"))
    top1 = _best_trial_test(sweep_dir)
    print(status)
    print(stdout)
    # one pseudo-label round: the defaults trained again with the ensemble's class-balanced most confident test images
    pseudo, wall_pseudo = train(work / "ensemble-pseudo", epochs, 0, [
        "--pseudo_labels", str(work / "ensemble-probs.csv"), "--pseudo_share", PSEUDO_ROUND_SHARE])
    return [(f"{count}-trial sweep, best trial by val/f1_macro", top1, wall / count),
            (f"{count}-trial sweep, top-3 ensemble", ensemble, wall + wall_ens),
            (f"{count}-trial sweep, mean trial", float(np.mean(scores)), wall / count),
            (f"the defaults + the top-3 ensemble's pseudo-labels (--pseudo_share {PSEUDO_ROUND_SHARE})", pseudo,
             wall_pseudo)]


def _trial_test(sweep_dir: Path, run_id: str) -> float | None:
    submission = sweep_dir / "runs" / run_id / "submission.csv"
    text = (sweep_dir / "trials" / f"{run_id}.log").read_text()
    return test_f1(text, submission) if "test/f1_macro" in text or submission.is_file() else None


def _best_trial_test(sweep_dir: Path) -> float:
    rows = list(csv.DictReader(open(sweep_dir / "leaderboard.csv")))
    return _trial_test(sweep_dir, rows[0]["run_id"])


def rank_correlation(work: Path) -> str:
    """Spearman correlation with the test macro-F1, over every run under `work` that logged both: each run's best
    noisy-validation val/f1_macro and its best clean val_clean/f1_macro."""
    from scipy.stats import spearmanr

    from utils.runs import read_local
    rows = []
    for metrics in sorted(work.rglob("metrics.jsonl")):
        history, summary = read_local(metrics.parent)
        clean = [h["val_clean/f1_macro"] for h in history if "val_clean/f1_macro" in h]
        if clean and "test/f1_macro" in summary:
            noisy = max(h["val/f1_macro"] for h in history if "val/f1_macro" in h)
            rows.append((noisy, max(clean), summary["test/f1_macro"]))
    if len(rows) < 3:
        return "rank correlation: fewer than 3 runs with both scores"
    noisy, clean, test = map(np.array, zip(*rows))
    return (f"rank correlation with the test macro-F1 over {len(rows)} runs (Spearman): noisy validation "
            f"{spearmanr(noisy, test)[0]:.2f}, clean validation {spearmanr(clean, test)[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=["reference loop", *RECIPES, *PSEUDO, *AVERAGED],
                        help="any of: 'reference loop', "
                        + ", ".join(repr(r) for r in [*RECIPES, *PSEUDO, *AVERAGED]).replace("%", "%%"))  # argparse: %
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="each recipe runs once per seed")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every run")
    parser.add_argument("--sweep", type=int, default=0, help="also run a sweep of this many trials (seed 0)")
    parser.add_argument("--work", default="", help="folder for the runs; default a temporary one")
    parser.add_argument("--data", default="digits_hard", choices=["digits_hard", "documents"],
                        help="the benchmark: the digits (datasets/digits.py), the documents (benchmarks/documents.py)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sweepcls-hard-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / ("hard" if args.data == "digits_hard" else "documents")
    if not folder.is_dir():  # the competition folder every documents run and the reference loop read
        run([sys.executable, "-m", "datasets.digits", "--export", str(folder), "--hard"] if args.data == "digits_hard"
            else [sys.executable, "benchmarks/documents.py", "--export", str(folder)])
    BENCH.update(data=args.data if args.data == "digits_hard" else str(folder), folder=folder,
                 answers=folder.with_name(folder.name + ".answers.csv"))
    print(f"| recipe ({args.epochs} epochs) | test macro-F1, mean ± std over seeds {args.seeds} | wall s per run | "
          f"its val/f1_macro, mean (mean abs(val - test)) |")
    print("|---|---|---|---|")
    for name in args.recipes:
        results, val = [], []
        for s in args.seeds:
            one = (reference if name == "reference loop" else functools.partial(averaged, name) if name in AVERAGED
                   else functools.partial(recipe, name))
            results.append(one(work, args.epochs, s))
            val.append(VALIDATION[-1] if name != "reference loop" else np.nan)  # the run that made the result
        f1, val = np.array([r[0] for r in results]), np.array(val)
        foretold = f"{val.mean():.3f} ({np.mean(np.abs(val - f1)):.3f})" if not np.isnan(val).any() else "-"
        print(f"| {name} | {f1.mean():.3f} ± {f1.std():.3f} ({', '.join(f'{v:.3f}' for v in f1)}) | "
              f"{np.mean([r[1] for r in results]):.0f} | {foretold} |", flush=True)
    if args.sweep:
        for name, f1, wall in sweep(work, args.epochs, args.sweep):
            print(f"| {name} | {f1:.3f} | {wall:.0f} |", flush=True)
    print(rank_correlation(work))
    print(f"runs in {work}")


if __name__ == "__main__":
    main()
