"""The experiment journal: one row per run, oldest first: when, what it changed, its score and how that
moved against its parent (--parent) or its baseline, notes, data, code, checkpoint.

Usage:
    python journal.py                          # the train.py runs under runs/ (or $SWEEPCLS_RUNS_DIR)
    python journal.py --sweep sweeps/sweep     # an offline sweep's trials, scored by the sweep's metric
    python journal.py --project comp           # online: the project's runs, from the W&B API
It prints the journal as markdown and writes it to journal.md in that folder (online: ./journal-<project>.md).

A run's baseline, when it has no parent, is the run whose changed keys are the largest strict subset of
its own (earliest among equals): for `lr=0.01 epochs=5`, a run with `epochs=5` alone. Keys every listed run
changes alike are printed once above the table instead of in each row.
"""
import argparse
import sys
from pathlib import Path

from utils import UserError, report_error
from utils.runs import runs_dir
from workflows.flags import HelpFormatter, add_config_flags
from workflows.journal import markdown, project_runs, runs_folder, sweep_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--runs", default="", help="a folder of train.py run folders; '' = $SWEEPCLS_RUNS_DIR or runs")
    source.add_argument("--sweep", default="", help="an offline sweep folder (sweep.py --sweep_dir)")
    source.add_argument("--project", default="", help="a W&B project (online)")  # '' = not this source
    add_config_flags(parser, "entity")  # with --project
    parser.add_argument("--out", default="", help="markdown file to write; '' = journal.md in the folder read")
    args = parser.parse_args(argv)
    try:
        if args.sweep:
            entries, title = sweep_folder(Path(args.sweep))
            out = Path(args.out or Path(args.sweep) / "journal.md")
        elif args.project:
            entries, title = project_runs(args.project, args.entity), f"W&B project {args.project}"
            out = Path(args.out or f"journal-{args.project}.md")
        else:
            root = Path(args.runs or runs_dir())
            entries, title = runs_folder(root), str(root)
            out = Path(args.out or root / "journal.md")
        if not entries:
            raise UserError(f"no train.py runs found in {title}")
    except UserError as e:
        return report_error(e)
    text = markdown(entries, title)
    print(text, end="")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
