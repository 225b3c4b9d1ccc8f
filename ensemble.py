"""Ensemble models into one submission: checkpoints, run dirs, W&B artifacts, or a sweep's top runs.

Usage:
    python ensemble.py runs/a runs/b runs/c --data /data/comp --out submission.csv
    python ensemble.py --sweep sweeps/sweep --top 3 --data digits --weights auto
    python ensemble.py --sweep ENTITY/PROJECT/SWEEP_ID --top 5 --data /data/comp --tta flip
Members may differ in backbone, image size and normalization: each is rebuilt from its own checkpoint.
--weights auto fits non-negative weights on a labelled set every member can be scored on without
leakage (their shared validation split, or out-of-fold predictions of cross-validated runs). The
ensemble is a W&B run (job_type=ensemble) with the scores, the submission and a table of the images
on which the members disagree. A run dir with a final fit (train.py --final_fit) predicts the test set with it;
its weight comes from its holdout model, which did not train on the validation images. --tta and --test_bn auto
(the default) give each member (each fold of a --cv run) what its own run decided. Predictions are cached per
(member, images, resolved TTA and test_bn) in --cache_dir.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from datasets import load_image, split_indices, write_submission
from datasets.cache import default_cache_dir
from datasets.corruption import any_on, noisy_copies, with_floor
from datasets.pseudo import write_probs
from utils import UserError, report_error, tracking
from utils.runs import new_run_id, runs_dir
from workflows.ensemble import (
    caruana,
    check_compatible,
    describe_steps,
    for_test,
    is_artifact_ref,
    load_test_data,
    member_probs,
    member_steps,
    monitor_metric,
    read_oof,
    resolve_member,
    score,
    sweep_member_refs,
)
from workflows.flags import HelpFormatter, add_config_flags


def labelled_set(members, data, args) -> tuple[str, np.ndarray, list[np.ndarray]]:
    """(name, labels, each member's probabilities) on images no member trained on."""
    if all(m.oof is not None for m in members):
        return "oof", data.labels, [read_oof(m, data.ids) for m in members]
    if any(m.oof is not None or m.meta.get("config", {}).get("cv") for m in members):
        raise UserError("--weights auto needs one labelled set all members share: all cross-validated runs "
                        "(out-of-fold predictions) or none; use --weights equal for this mix")
    splits = {}
    for m in members:
        c = m.meta.get("config", {})
        if any(k not in c for k in ("val_fraction", "folds", "fold", "seed")):
            raise UserError(f"member {m.name} records no validation split in its checkpoint; use --weights equal")
        val = split_indices(data.labels, data.groups, c["val_fraction"], c["folds"], c["fold"], c["seed"])[1]
        splits.setdefault(tuple(val), []).append(m.name)
    if len(splits) > 1:
        raise UserError(f"members were validated on different splits ({list(splits.values())}: seed, val_fraction "
                        f"or fold differ), so no split is unseen by all; use --weights equal or cross-validated runs")
    val = np.array(next(iter(splits)))
    items, name = [data.items[i] for i in val], "val"
    shift, config = members[0].meta.get("test_shift"), members[0].meta["config"]
    if config.get("val_noise") == "auto" and shift and any_on(shift["settings"]):  # as the members were validated
        settings = with_floor(shift["settings"], config.get("aug_floor", 0.0))
        items = noisy_copies(items, [data.ids[i] for i in val], settings, members[0].meta["img_size"])
        name = "val_noisy"
    return name, data.labels[val], [member_probs(m, items, args.tta, args.cache_dir, args.batch_size, args.device)
                                     for m in members]


def fit_weights(members, data, args, metric: str) -> tuple[np.ndarray, dict]:
    """(weights, {set name: each member's score and the ensemble's}): Caruana weights on the labelled set the
    members share when --weights auto, or when it is not given and there is one; else equal weights (args.weights
    says which)."""
    explicit, args.weights = args.weights is not None, args.weights or "auto"
    equal = np.full(len(members), 1 / len(members))
    if args.weights == "equal":
        return equal, {}
    try:
        if not len(data.labels):
            raise UserError(f"--weights auto scores members on labelled images, and --data {args.data} has none; "
                            f"pass the training data folder or use --weights equal")
        set_name, labels, probs = labelled_set(members, data, args)
    except UserError as e:
        if explicit:
            raise
        print(f"note: equal weights ({e})")
        args.weights = "equal"
        return equal, {}
    weights = caruana(probs, labels, metric)
    ensemble = sum(w * p for w, p in zip(weights, probs))
    return weights, {set_name: [score(metric, labels, p) for p in probs + [ensemble]]}


def disagreement_rows(data, probs: list[np.ndarray], ensemble: np.ndarray, max_rows: int) -> list[list]:
    """Test images on which the members' predictions differ: most distinct answers, then least sure, first."""
    preds = np.stack([p.argmax(1) for p in probs])
    distinct = np.array([len(set(col)) for col in preds.T])
    rows = np.flatnonzero(distinct > 1)
    rows = rows[np.lexsort((ensemble[rows].max(1), -distinct[rows]))][:max_rows]
    classes = data.classes
    out = []
    for r in rows:
        true = [classes[data.test_labels[r]]] if data.test_labels is not None else []
        out.append([data.test_ids[r], load_image(data.test_items[r]), *true, classes[ensemble[r].argmax()],
                    float(ensemble[r].max())]
                   + [v for p in probs for v in (classes[p[r].argmax()], float(p[r].max()))])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("members", nargs="*", help="checkpoint files, run dirs or W&B artifact refs")
    parser.add_argument("--sweep", default="",
                        help="add the top runs of an offline sweep dir or ENTITY/PROJECT/SWEEP_ID")
    parser.add_argument("--top", type=int, default=3, help="how many runs --sweep adds")
    parser.add_argument("--weights", default=None, choices=["equal", "auto"],
                        help="auto: Caruana weights on the validation set the members share (default where there is "
                             "one, else equal)")
    parser.add_argument("--out", default="submission.csv", help="the ensemble's submission file (the columns of the "
                                                                "data's sample_submission.csv)")
    parser.add_argument("--save_probs", default="", help="also write the ensemble's test probabilities "
                                                         "(id,source,p_<class>...): train.py --pseudo_labels reads "
                                                         "them")
    parser.add_argument("--out_dir", default="",
                        help="the ensemble run's folder; '' = $SWEEPCLS_RUNS_DIR/ensemble-<run id>, by default "
                             "runs/ensemble-<run id>")
    # --data: its test set is predicted; a larger batch than training's: no gradients are kept
    add_config_flags(parser, "tta", "test_bn", "device", "cache_dir", "table_rows", "wandb_mode", "project", "entity",
                     required=("data",), batch_size=64)
    return parser


def load_members(refs: list[str], cache_dir: Path) -> list:
    """Each ref resolved to its checkpoint(s) and meta, under a unique name (the names key the scores and the
    table's columns); members that cannot be ensembled (other classes) are refused."""
    members = [resolve_member(ref, cache_dir) for ref in refs]
    for i, m in enumerate(members):
        if any(m.name == other.name for other in members[:i]):
            m.name = f"{m.name}#{i + 1}"
    check_compatible(members)
    return members


def print_scores(members, weights: np.ndarray, table: dict) -> None:
    """One row per member and one for the ensemble: model, image size, weight, and each set's score."""
    names = [m.name for m in members] + ["ensemble"]
    print(f"{'member':<40} {'model':<22} {'px':>4} {'weight':>6}  " + "  ".join(f"{s:>6}" for s in table))
    for i, (name, w) in enumerate(zip(names, [*weights, 1.0])):
        model, px = (members[i].meta["model"], str(members[i].meta["img_size"])) if i < len(members) else ("", "")
        print(f"{name[-40:]:<40} {model:<22} {px:>4} {w:>6.3f}  "
              + "  ".join(f"{v[i]:>6.4f}" for v in table.values()))


def weighted(weights: np.ndarray, probs: list[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: each member's, weighted."""
    return sum(w * p for w, p in zip(weights, probs))


def log_ensemble_run(args, refs: list[str], members, weights: np.ndarray, metric: str, table: dict, data,
                     test: list[np.ndarray]) -> None:
    """The ensemble (the members' test probabilities `test`, weighted) as a W&B run: its scores, the submission (and
    probabilities) as artifacts, the disagreements."""
    ensemble = weighted(weights, test)
    names = [m.name for m in members] + ["ensemble"]
    # W&B keys: <set>/<member>/<metric>; a member named by an artifact ref keeps its slashes out of the key
    scores = {f"{s}/{name.replace('/', '_')}/{metric}": v[i] for s, v in table.items() for i, name in enumerate(names)}
    run_id = new_run_id()
    out_dir = Path(args.out_dir or runs_dir() / f"ensemble-{run_id}")
    steps = {m.name: [{"tta": st.tta, "test_bn": st.test_bn} for st in member_steps(m, args.tta, args.test_bn)]
             for m in members}  # what auto became, per member and checkpoint
    run = tracking.init({"members": refs, "weights": weights.tolist(), "weighting": args.weights, "tta": args.tta,
                         "test_bn": args.test_bn, "test_time": steps, "data": args.data, "metric": metric,
                         "models": [m.meta["model"] for m in members]},
                        run_id, out_dir, args.wandb_mode, tracking.RunOptions(
                            project=args.project, entity=args.entity, name=f"ensemble-{run_id}", job_type="ensemble"))
    parts = [part for ref in refs for part in ref.split("+")]  # A+B+...: a --cv run's folds, one member
    for ref in filter(is_artifact_ref, parts):  # online: model artifact -> this ensemble in W&B's lineage graph
        try:
            run.use_artifact(ref)
        except UserError as e:  # the submission is written already: say so, and finish the run
            print(f"note: the ensemble run is not linked to {ref} ({e})", file=sys.stderr)
    run.set_summary(scores)
    run.log_artifact(Path(args.out), f"submission-{run_id}", "submission",
                     {"members": refs, "weights": weights.tolist()})
    if args.save_probs:
        write_probs(Path(args.save_probs), data.test_ids, ensemble, members[0].meta["classes"],
                    f"ensemble-{run_id} of {', '.join(m.name for m in members)}")
        run.log_artifact(Path(args.save_probs), f"test-probs-{run_id}", "test-probs", {"members": refs})
    columns = ["id", "image"] + (["true"] if data.test_labels is not None else []) + ["ensemble", "ensemble_conf"]
    columns += [c for m in members for c in (f"{m.name} pred", f"{m.name} conf")]
    run.log_table("test/disagreement", columns, disagreement_rows(data, test, ensemble, args.table_rows))
    run.finish()
    print(f"results in {args.out}" + (f" and {args.save_probs}" if args.save_probs else "")
          + f"; the W&B run in {out_dir}/\nnext: submit {args.out}"
          + ("" if args.save_probs else f"; --save_probs FILE, then python train.py --data {args.data} "
                                        f"--pseudo_labels FILE: a pseudo-label round"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.cache_dir = Path(args.cache_dir or default_cache_dir())
    try:
        refs = args.members + (sweep_member_refs(args.sweep, args.top) if args.sweep else [])
        if not refs:
            parser.error("give members, or --sweep with --top")
        members = load_members(refs, args.cache_dir)
        data = load_test_data(args.data, members[0].meta)
        for line in (line for m in members for line in describe_steps(for_test(m), args.tta, args.test_bn)):
            print(line)
        metric = monitor_metric(members[0].meta)
        weights, table = fit_weights(members, data, args, metric)  # table: set -> each member's score + the ensemble's
        test = [member_probs(for_test(m), data.test_items, args.tta, args.cache_dir, args.batch_size, args.device,
                             args.test_bn) for m in members]  # a run's final fit where it has one
    except UserError as e:
        return report_error(e)
    ensemble = weighted(weights, test)
    write_submission(Path(args.out), data, ensemble.argmax(1))
    if data.test_labels is not None:
        table["test"] = [score(metric, data.test_labels, p) for p in test + [ensemble]]
    print_scores(members, weights, table)
    print(f"wrote {args.out} ({args.weights} weights, tta {args.tta}, test_bn {args.test_bn})")
    log_ensemble_run(args, refs, members, weights, metric, table, data, test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
