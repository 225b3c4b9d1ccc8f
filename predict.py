"""One model on a test set: writes the submission (sample_submission.csv's rows and order where there is one).

Usage:
    python predict.py runs/<model>-<id> --data /data/comp --out submission.csv   # its final fit, where it has one
    python predict.py runs/<model>-<id>/best.safetensors --data /data/test_images --tta flip
    python predict.py ENTITY/PROJECT/model-<run id>:best --data /data/comp      # online: pulls the artifact
The model is rebuilt from its checkpoint alone (backbone, classes, image size, normalization). --tta and --test_bn
auto (the default) use what the checkpoint's run decided for its test set, said in one line each; a checkpoint from
before such decisions were recorded gets the ones its measured shift gives, without the validation check.
"""
import argparse
import sys
from pathlib import Path

from datasets import write_submission
from datasets.cache import default_cache_dir
from datasets.pseudo import write_probs
from utils import UserError, report_error
from utils.metrics import classification_metrics
from workflows.ensemble import describe_steps, for_test, load_test_data, member_probs, resolve_member
from workflows.flags import HelpFormatter, add_config_flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("member", help="checkpoint file, run dir (a --cv run: its folds averaged) or W&B artifact ref")
    parser.add_argument("--out", default="submission.csv", help="submission file to write")
    parser.add_argument("--save_probs", default="", help="also write the test probabilities (id,source,p_<class>...): "
                                                         "train.py --pseudo_labels reads them")
    # --data: its test set, or a folder of test images (the usage below); a larger batch than training's: no gradients
    add_config_flags(parser, "tta", "test_bn", "device", "cache_dir", required=("data",), batch_size=64)
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir or default_cache_dir())
    try:
        member = for_test(resolve_member(args.member, cache_dir))  # a run dir: its final fit, as its submission
        data = load_test_data(args.data, member.meta)
        for line in describe_steps(member, args.tta, args.test_bn):
            print(line)
        probs = member_probs(member, data.test_items, args.tta, cache_dir, args.batch_size, args.device,
                             args.test_bn)
        write_submission(Path(args.out), data, probs.argmax(1))
        if args.save_probs:
            source = f"{member.name} (run {member.meta.get('run_id', '?')}, {member.meta['model']})"
            write_probs(Path(args.save_probs), data.test_ids, probs, member.meta["classes"], source)
    except UserError as e:
        return report_error(e)
    scored = ""
    if data.test_labels is not None:
        m = classification_metrics(data.test_labels, probs)
        scored = f" | test/f1_macro {m['f1_macro']:.4f} | test/acc {m['acc']:.4f}"
    print(f"{member.name} ({member.meta['model']}, {member.meta['img_size']} px, {len(member.paths)} checkpoint(s)) "
          f"on {len(data.test_items)} images{scored} | wrote {args.out}")
    print(f"next: submit {args.out}; python ensemble.py {args.member} runs/<other run> --data {args.data} (several "
          f"runs), or python validate.py {args.member} --data DIR (score it on labelled images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
