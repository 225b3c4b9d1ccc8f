"""Score a trained model on labelled images: its metrics, a per-class table and report.html, as timm's validate.py.

Usage:
    python validate.py runs/<model>-<id> --data /data/holdout                 # a folder of class folders: every image
    python validate.py runs/<model>-<id>/best.safetensors --data digits --split test --tta flip
    python validate.py runs/<model>-<id> --data /data/comp --split val         # the run's own validation split again
    python validate.py ENTITY/PROJECT/model-<run id>:best --data /data/holdout   # online: pulls the artifact
The model is rebuilt from its checkpoint alone; the data's class names are matched to the checkpoint's by name (a
class it does not know is an error; classes absent from the data are fine, their support 0). A run dir is scored
with the model predict.py uses (its final fit where it has one), except on --split val: its holdout model. --tta and
--test_bn auto (the default) use what the checkpoint's run decided for its test set, as in predict.py; on --split
val, none, as the run validated. Writes report.html, val_probs.csv (id,label,pred,p_<class>...) and metrics.json
into --out_dir.
"""
import argparse
import sys
from pathlib import Path

from datasets.cache import default_cache_dir
from utils import UserError, report_error
from utils.metrics import classification_metrics
from utils.runs import runs_dir
from workflows.ensemble import describe_steps, file_stem, member_probs, member_steps, resolve_member
from workflows.flags import HelpFormatter, add_config_flags
from workflows.validate import (
    SPLIT_HELP,
    SPLITS,
    labelled_part,
    metrics_line,
    per_class_table,
    val_steps,
    write_outputs,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="validate.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("member", help="checkpoint file, run dir (a --cv run: its folds averaged) or W&B artifact ref")
    parser.add_argument("--split", default="auto", choices=SPLITS, help=SPLIT_HELP)
    parser.add_argument("--out_dir", default="", help="folder of report.html, val_probs.csv and metrics.json; "
                                                      "'' = runs/validate-<member>-<split>/")
    # --data: labelled images as train.py reads them; the columns: the checkpoint's run's unless given
    add_config_flags(parser, "tta", "test_bn", "device", "cache_dir", required=("data",), batch_size=64,
                     image_col="", label_col="")
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir or default_cache_dir())
    try:
        member, part = labelled_part(resolve_member(args.member, cache_dir), args.data, args.split,
                                     args.image_col, args.label_col)
        tta, test_bn, lines = val_steps(part, args.tta, args.test_bn)
        for line in ([f"split auto: {part.split} ({part.why})"] if part.why else []) + lines + describe_steps(
                member, tta, test_bn):
            print(line)
        probs = member_probs(member, part.items, tta, cache_dir, args.batch_size, args.device, test_bn)
        m = classification_metrics(part.labels, probs)
        out_dir = Path(args.out_dir or runs_dir() / f"validate-{file_stem(member)}-{part.split}")
        saved = write_outputs(out_dir, member, part, probs, m, member_steps(member, tta, test_bn))
    except UserError as e:
        return report_error(e)
    print(per_class_table(m, member.meta["classes"]))
    print(metrics_line(member, part, m))
    print(f"results in {out_dir}/: " + ", ".join(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
