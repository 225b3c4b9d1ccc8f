"""Average the weights of a fit's best epochs into one checkpoint, as timm's avg_checkpoints.py does.

Usage:
    python avg_checkpoints.py runs/<model>-<id>                 # its kept epochs (the top --keep_top_k), averaged
    python avg_checkpoints.py runs/<model>-<id> --top 3 --out runs/<model>-<id>/avg3.safetensors
    python avg_checkpoints.py a.safetensors b.safetensors --out averaged.safetensors
A run dir gives its epoch-NNN.safetensors, ranked by the run's monitored score (train.py keeps the top --keep_top_k;
keep more, e.g. --keep_top_k 5, to average more). The result is a sweepcls checkpoint like any other (its metadata:
the best one's, with `averaged_from`): predict.py, validate.py, ensemble.py and export.py take it. BatchNorm running
statistics are averaged too; compare on the run's own validation split before using it:
    python validate.py runs/<model>-<id>/averaged.safetensors --data DIR --split val
"""
import argparse
import sys
from pathlib import Path

from models.checkpoint import average_checkpoints, checkpoint_bytes, read_meta
from utils import UserError, report_error
from utils.files import atomic_write_bytes
from workflows.config import maximizes
from workflows.flags import HelpFormatter


def ranked_epochs(run_dir: Path) -> list[Path]:
    """A fit's kept epoch checkpoints, best first by the monitor its run trained with."""
    files = sorted(run_dir.glob("epoch-*.safetensors"))
    if not files:
        raise UserError(f"{run_dir}: no epoch-NNN.safetensors (the folder of a fit: a run dir, its final/ or fold<k>/)")
    metas = {p: read_meta(p) for p in files}
    config = metas[files[0]]["config"]
    key, sign = config["monitor"], 1 if maximizes(config["monitor"], config.get("monitor_mode", "auto")) else -1
    scores = {p: metas[p].get("metrics", {}).get(key) for p in files}
    return sorted(files, key=lambda p: (scores[p] is None, -sign * (scores[p] or 0)))  # unscored last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avg_checkpoints.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", help="a run dir (its kept epoch checkpoints), or checkpoint files")
    parser.add_argument("--top", type=int, default=0, help="average the best N of a run dir's epochs; 0 = all kept")
    parser.add_argument("--out", default="", help="file to write; '' = <run dir>/averaged.safetensors (files given: "
                                                  "averaged.safetensors beside the first)")
    args = parser.parse_args(argv)
    try:
        run_dir = Path(args.inputs[0]) if len(args.inputs) == 1 and Path(args.inputs[0]).is_dir() else None
        paths = ranked_epochs(run_dir)[:args.top or None] if run_dir else [Path(p) for p in args.inputs]
        if missing := [str(p) for p in paths if not p.is_file()]:
            raise UserError(f"no such checkpoint: {', '.join(missing)}")
        if len(paths) < 2:
            raise UserError(f"{len(paths)} checkpoint to average; give two or more (a run dir keeps --keep_top_k "
                            f"epochs: train with --keep_top_k 3 or more)")
        try:
            state, meta = average_checkpoints(paths)
        except ValueError as e:
            raise UserError(str(e)) from None
        out = Path(args.out) if args.out else (run_dir or paths[0].parent) / "averaged.safetensors"
        atomic_write_bytes(out, checkpoint_bytes(state, meta))
    except UserError as e:
        return report_error(e)
    print(f"averaged {len(paths)} checkpoints: "
          + ", ".join(f"{p.name} (epoch {source['epoch']})" for p, source in zip(paths, meta["averaged_from"])))
    print(f"results in {out.parent}/: {out.name}\nnext: python validate.py {out} --data DIR --split val "
          f"(against {paths[0]}); python predict.py {out} --data DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
