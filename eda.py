"""Look at the data before training, and at two models' differences after: each a W&B run (job_type=eda).

Usage:
    python eda.py --data /data/comp                     # classes, sizes, samples, duplicates, train-vs-test gap
    python eda.py --diff runs/a runs/b --data /data/comp   # runs, checkpoints or submission CSVs
--data takes what train.py takes. The train-vs-test table says, per statistic (brightness, contrast,
estimated noise, sharpness, orientation, landscape share), how far the test images sit from the training
images in training standard deviations: the clean-train / noisy-test gap in numbers. Duplicates are near-identical
perceptual hashes (pHash, at most --max_distance of 64 bits apart), across train and test too.
The run diff lists the images one model gets right and the other wrong (the test set must be
labelled, e.g. test/<class>/), else the images where they disagree.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from datasets import load_data, load_image, write_csv
from datasets.cache import default_cache_dir
from utils import UserError, tracking
from utils.runs import new_run_id, runs_dir
from workflows.eda import describe, near_duplicates, split_gap
from workflows.flags import HelpFormatter, add_config_flags

SAMPLES = 8


def explore(args, run, out_dir: Path) -> dict:
    data = load_data(args.data, args.image_col, args.label_col)
    records = describe(data)
    train = [r for r in records if r["split"] == "train"]
    counts = np.bincount(data.labels, minlength=len(data.classes))
    run.log_table("eda/class_distribution", ["class", "images", "share"],
                  [[c, int(n), n / counts.sum()] for c, n in zip(data.classes, counts)])
    size_columns = ["id", "split", "label", "width", "height", "aspect"]
    sizes = [[r[c] for c in size_columns] for r in records]
    write_csv(out_dir / "image_sizes.csv", size_columns, sizes)
    run.log_table("eda/image_sizes", size_columns, sizes, full_copy=out_dir / "image_sizes.csv")
    item = lambda r: data.items[r["index"]] if r["split"] == "train" else data.test_items[r["index"]]
    grid = []
    for k, c in enumerate(data.classes):
        rows = np.flatnonzero(data.labels == k)[:SAMPLES]
        grid.append([c, int(counts[k]), *[load_image(data.items[i]) for i in rows], *[None] * (SAMPLES - len(rows))])
    run.log_table("eda/samples", ["class", "images", *[f"sample_{i}" for i in range(1, SAMPLES + 1)]], grid)

    pairs = near_duplicates(np.array([r["hash"] for r in records], np.uint64), args.max_distance)
    rows = []
    for i, j, d in pairs:
        a, b = records[i], records[j]
        kind = "-".join(sorted((a["split"], b["split"]), key=["train", "test"].index))
        conflict = kind == "train-train" and a["label"] != b["label"]
        rows.append([a["id"], a["split"], a["label"], load_image(item(a)), b["id"], b["split"], b["label"],
                     load_image(item(b)), d, kind, conflict])
    columns = ["id_a", "split_a", "label_a", "image_a", "id_b", "split_b", "label_b", "image_b", "distance", "kind",
               "label_conflict"]
    run.log_table("eda/duplicates", columns, rows[:args.table_rows])
    write_csv(out_dir / "duplicates.csv", [c for c in columns if not c.startswith("image")],
               [[v for c, v in zip(columns, r) if not c.startswith("image")] for r in rows])

    gap = split_gap(records)
    if gap:
        run.log_table("eda/train_vs_test", list(gap[0]), [list(g.values()) for g in gap])
    summary = {"eda/train_images": len(train), "eda/test_images": len(records) - len(train),
               "eda/classes": len(data.classes), "eda/imbalance": float(counts.max() / max(counts.min(), 1)),
               "eda/duplicates": len(rows), "eda/duplicates_train_test": sum(r[9] == "train-test" for r in rows),
               "eda/duplicate_label_conflicts": sum(r[10] for r in rows),
               **{f"eda/gap/{g['stat']}": g["gap_in_train_std"] for g in gap}}
    print(f"{len(train)} training images in {len(data.classes)} classes (largest/smallest "
          f"{summary['eda/imbalance']:.1f}), {summary['eda/test_images']} test images")
    print(f"{len(rows)} near-duplicate pair(s), {summary['eda/duplicates_train_test']} across train and test, "
          f"{summary['eda/duplicate_label_conflicts']} with different labels: {out_dir / 'duplicates.csv'}")
    for g in gap:
        print(f"  {g['stat']:<10} train {g['train_mean']:8.2f} +- {g['train_std']:6.2f} | test {g['test_mean']:8.2f} "
              f"+- {g['test_std']:6.2f} | gap {g['gap_in_train_std']:+.2f} train std")
    return summary


def _predictions(ref: str, data, cache_dir: Path) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(name, predicted class per test image, confidence or None) from a submission CSV, a run or a checkpoint."""
    path = Path(ref)
    if path.suffix == ".csv" and path.is_file():
        with open(path, newline="") as fh:
            rows = {r[0]: r[1] for r in list(csv.reader(fh))[1:] if len(r) >= 2}
        index = {str(t): k for k, t in enumerate(data.targets)} | {c: k for k, c in enumerate(data.classes)}
        missing = [i for i in data.test_ids if i not in rows]
        unknown = sorted({v for v in rows.values() if v not in index})
        if missing or unknown:
            raise UserError(f"{ref}: {len(missing)} test id(s) missing (e.g. {missing[:3]}), labels not among the "
                            f"classes: {unknown[:5]}")
        return path.name, np.array([index[rows[i]] for i in data.test_ids]), None
    from workflows.ensemble import describe_steps, member_probs, resolve_member
    member = resolve_member(ref, cache_dir)
    if member.meta["classes"] != data.classes:
        raise UserError(f"{ref} was trained on classes {member.meta['classes']}, --data has {data.classes}")
    for line in describe_steps(member, "auto", "auto"):  # as predict.py predicts it by default
        print(line)
    probs = member_probs(member, data.test_items, "auto", cache_dir, test_bn="auto")
    return member.name, probs.argmax(1), probs.max(1)


def diff(args, run, out_dir: Path) -> dict:
    data = load_data(args.data, args.image_col, args.label_col)
    if not data.test_items:
        raise UserError(f"--data {args.data}: no test images to compare the two on")
    cache_dir = Path(args.cache_dir or default_cache_dir())
    (name_a, pred_a, conf_a), (name_b, pred_b, conf_b) = (_predictions(r, data, cache_dir) for r in args.diff)
    truth = data.test_labels
    if truth is not None:
        rows = np.flatnonzero((pred_a == truth) != (pred_b == truth))
        kind = lambda i: f"{'A' if pred_a[i] == truth[i] else 'B'} right"
    else:
        rows = np.flatnonzero(pred_a != pred_b)
        kind = lambda i: "differ"
    conf = lambda c, i: float(c[i]) if c is not None else None
    columns = ["id", "image", "true", f"A: {name_a}", "A conf", f"B: {name_b}", "B conf", "who is right"]
    table = [[data.test_ids[i], load_image(data.test_items[i]), data.classes[truth[i]] if truth is not None else "",
              data.classes[pred_a[i]], conf(conf_a, i), data.classes[pred_b[i]], conf(conf_b, i), kind(i)]
             for i in rows]
    run.log_table("diff/images", columns, table[:args.table_rows])
    write_csv(out_dir / "diff.csv", [c for c in columns if c != "image"], [r[:1] + r[2:] for r in table])
    summary = {"diff/images": len(table), "diff/agree": float(np.mean(pred_a == pred_b))}
    if truth is not None:
        summary |= {"diff/A_right_B_wrong": int(np.sum((pred_a == truth) & (pred_b != truth))),
                    "diff/B_right_A_wrong": int(np.sum((pred_b == truth) & (pred_a != truth))),
                    "diff/A_acc": float(np.mean(pred_a == truth)), "diff/B_acc": float(np.mean(pred_b == truth))}
    print(f"A = {name_a}, B = {name_b}: agree on {summary['diff/agree']:.1%} of {len(pred_a)} test images; "
          + (f"A right and B wrong on {summary['diff/A_right_B_wrong']}, B right and A wrong on "
             f"{summary['diff/B_right_A_wrong']}" if truth is not None else f"{len(table)} differ (no test labels)")
          + f": {out_dir / 'diff.csv'}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"), help="two runs, checkpoints or submission CSVs")
    parser.add_argument("--max_distance", type=int, default=4,
                        help="pHash bits two near-duplicates may differ in (of 64)")
    parser.add_argument("--out_dir", default="",
                        help="'' = $SWEEPCLS_RUNS_DIR/eda-<run id>, by default runs/eda-<run id>")
    add_config_flags(parser, "data", "image_col", "label_col", "table_rows", "cache_dir", "wandb_mode", "project",
                     "entity")
    args = parser.parse_args(argv)
    run_id = new_run_id()
    out_dir = Path(args.out_dir or runs_dir() / f"eda-{run_id}")
    run = tracking.init({k: v for k, v in vars(args).items() if k != "out_dir"}, run_id, out_dir, args.wandb_mode,
                        tracking.RunOptions(project=args.project, entity=args.entity,
                                            name=f"{'diff' if args.diff else 'eda'}-{run_id}", job_type="eda"))
    code = run.run_to_end(lambda: run.set_summary(
        diff(args, run, out_dir) if args.diff else explore(args, run, out_dir)))
    if not code:  # the last lines, after W&B's footer
        print(f"results in {out_dir}/: " + ("diff.csv" if args.diff else "image_sizes.csv, duplicates.csv")
              + ", and the W&B run's tables" + ("" if args.diff else f"\nnext: python train.py --data {args.data}"))
    return code


if __name__ == "__main__":
    sys.exit(main())
