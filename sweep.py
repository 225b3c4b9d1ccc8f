"""Run a sweep.yaml where there is no W&B server: W&B's own `sweeps` engine proposes (random, grid,
bayes, hyperband), each trial is train.py launched exactly as `wandb agent` launches it, and all
state lives in the sweep dir, so a killed runner restarted with the same command carries on.

Usage:
    python sweep.py sweep.yaml --count 8 --workers 2        # state in sweeps/sweep/ (--sweep_dir)
    python sweep.py --status sweeps/sweep                    # progress and the leaderboard
    python sweep.py sweep.yaml --check                       # validate only
Online, the same file goes to W&B itself: wandb sweep sweep.yaml, then wandb agent ENTITY/PROJECT/ID.

--count is the sweep's total: rerunning with a larger count adds trials. Each trial is an offline
W&B run (unless WANDB_MODE says otherwise) grouped and tagged by sweep; --status prints how to sync
them and attach them to a server-side sweep.
"""
import argparse
import os
import sys
from pathlib import Path

import yaml

from utils import UserError, report_error
from utils.runs import DEFAULT_PROJECT
from workflows.sweep import DONE, SweepDir, load_sweep, short, varied_keys, write_leaderboard
from workflows.sweep_runner import Runner, RunnerSettings


# ----------------------------------------------------------------------------- leaderboard
def print_status(sweep: dict, sdir: SweepDir, info: dict) -> None:
    rows = write_leaderboard(sweep, sdir)
    states = [r["state"] for r in rows]
    print(f"sweep {info['name']} ({info['id']}) in {sdir.root}: {len(rows)} trials, "
          + ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)))
    metric = (sweep.get("metric") or {}).get("name", "metric")
    header = ["rank", "run_id", "state", metric, *varied_keys(sweep), "checkpoint"]
    table = [[str(r["rank"]), r["run_id"], r["state"], "" if r["metric"] is None else f"{r['metric']:.4f}",
              *(short(r[k]) for k in varied_keys(sweep)), r["checkpoint"]] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
    for line in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    finished = [r["run_id"] for r in rows if r["state"] in DONE]
    if finished:
        project = (sweep.get("project") or sweep["parameters"].get("project", {}).get("value")
                   or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT)
        print(f"\nupload the runs:        wandb sync {sdir.runs_dir}/*/wandb/offline-run-*"
              f"\nthen attach them to a server-side sweep (bayes learns from them):"
              f"\n  wandb sweep -p {project} {' '.join('-R ' + i for i in finished)} {info['source']}")
        print(f"the journal (what each trial changed, its score against the baseline): "
              f"python journal.py --sweep {sdir.root}")


def _key_value(text: str, parser) -> tuple[str, object]:
    """KEY=VALUE of --set, the value read as YAML reads it (1 -> int, 0.1 -> float, true -> bool)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--set {text}: expected KEY=VALUE, e.g. --set epochs=1")
    return key.strip().lstrip("-"), yaml.safe_load(value) if value.strip() else ""


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("sweep_yaml", nargs="?", help="the sweep file, as for `wandb sweep`")
    parser.add_argument("--count", type=int, default=None, help="total trials in the sweep (grid: default all points)")
    parser.add_argument("--workers", type=int, default=1, help="trials at once")
    parser.add_argument("--sweep_dir", default=None, help="all state; default sweeps/<yaml name>")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids; each trial gets the least busy one")
    parser.add_argument("--max_failures", type=int, default=3, help="stop after this many failed trials in a row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the proposals")
    parser.add_argument("--kill_delay", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL for a trial")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a train.py key for every trial (repeatable): a quick try, e.g. --set epochs=1")
    parser.add_argument("--check", action="store_true", help="validate the sweep file and exit")
    parser.add_argument("--status", metavar="DIR", default=None, help="print a sweep dir's progress and leaderboard")
    args = parser.parse_args(argv)
    try:
        if args.status:
            sdir = SweepDir(Path(args.status))
            info = sdir.info()
            print_status(info["sweep"], sdir, info)
            return 0
        if not args.sweep_yaml:
            parser.error("give a sweep file (or --status DIR)")
        overrides = dict(_key_value(text, parser) for text in args.set)
        sweep = load_sweep(args.sweep_yaml, overrides)  # every problem before any trial starts
        if overrides:
            print("every trial: " + ", ".join(f"{k}={v}" for k, v in overrides.items()) + " (--set)")
        if args.check:
            print(f"{args.sweep_yaml}: ok ({sweep['method']}, {len(sweep['parameters'])} parameters)")
            return 0
        if args.count is None and sweep["method"] != "grid":
            parser.error(f"--count is required for method {sweep['method']}")
        if args.workers < 1 or (args.count is not None and args.count < 1):
            parser.error("--workers and --count must be >= 1")
        sdir = SweepDir(Path(args.sweep_dir or Path("sweeps") / Path(args.sweep_yaml).stem))
        sdir.root.mkdir(parents=True, exist_ok=True)
        lock = sdir.lock()
        info = sdir.create_or_check(sweep, args.sweep_yaml)
        runner = Runner(sweep, sdir, info, RunnerSettings(args.count, args.workers, args.max_failures,
                                                          [g for g in args.gpus.split(",") if g], args.seed,
                                                          kill_delay=args.kill_delay))
        print(f"sweep {info['name']} ({info['id']}) in {sdir.root}: {len(runner.trials)} trials so far, "
              f"up to {args.count or 'all grid points'}, {args.workers} at once")
        code = runner.run()
        print()
        print_status(sweep, sdir, info)
        lock.close()
        return code
    except UserError as e:
        return report_error(e)


if __name__ == "__main__":
    sys.exit(main())
