"""The validation split: a stratified holdout or one fold of K (grouped when there are groups), fixed by the seed.
Usage: train_idx, val_idx = split_indices(data.labels, data.groups, val_fraction=0.2, folds=0, fold=0, seed=42)
"""
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split


def split_indices(labels: np.ndarray, groups: np.ndarray | None, val_fraction: float,
                  folds: int, fold: int, seed: int, given: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/val indices, deterministic given seed; with groups, no group is in both. given (a bool per
    image: the data's own validation split, an ImageFolder's val/) is the holdout as it is; K folds pool it."""
    idx = np.arange(len(labels))
    if given is not None and folds == 0:
        return idx[~given], idx[given]
    counts = np.bincount(labels)
    if groups is None and folds == 0:
        stratify = labels if counts[counts > 0].min() >= 2 else None
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=stratify, random_state=seed)
        return np.sort(train_idx), np.sort(val_idx)
    n_splits = folds or max(2, round(1 / val_fraction))
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = list(splitter.split(idx, labels, groups))[fold if folds else 0]
    return train_idx, val_idx

