"""What a run writes for the leaderboard and for error analysis: submission.csv and the out-of-fold probabilities.
Usage: write_submission(out_dir / "submission.csv", data, probs.argmax(1))
"""
from pathlib import Path

import numpy as np

from datasets.files import Data, write_csv


def write_submission(path: Path, data: Data, pred: np.ndarray) -> None:
    """ID,target rows in the order of data.test_ids (the sample submission's order where there is one); with a
    sample submission, every one of its columns in its order, the prediction in its target column and any other
    column (a Usage, a second id) as the sample has it."""
    id_col, target_col = data.submission_columns
    if data.submission_template is None:
        write_csv(path, data.submission_columns, ((i, data.targets[p]) for i, p in zip(data.test_ids, pred)))
        return
    header, rows = data.submission_template
    by_id = {r[id_col]: r for r in rows}
    write_csv(path, header, ([data.targets[p] if h == target_col else by_id[i][h] for h in header]
                             for i, p in zip(data.test_ids, pred)))


def write_oof(path: Path, data: Data, probs: np.ndarray, folds: np.ndarray) -> None:
    """Out-of-fold probabilities of every labelled image: id, label, fold, p_<class>..."""
    write_csv(path, ["id", "label", "fold"] + [f"p_{c}" for c in data.classes],
              ([i, data.classes[y], f, *(f"{p:.6g}" for p in row)]
               for i, y, f, row in zip(data.ids, data.labels, folds, probs)))

