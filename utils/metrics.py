"""Classification metrics from scikit-learn, and a labelled set's predictions as tables and reports show them.
Usage: m = classification_metrics(y_true, probs); Predictions(ids, images, y_true, probs, classes)"""
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


@dataclass
class Predictions:
    """A labelled set's predictions, as the W&B tables (utils/tracking) and report.html (workflows/report.py) show
    them."""
    ids: list  # each row's image id
    images: Callable  # images(row) -> HxWx3 uint8, decoded only when shown
    y_true: np.ndarray  # class index per row
    probs: np.ndarray  # rows x classes
    classes: list  # class names


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """acc, macro-F1, ACSA (balanced accuracy: mean per-class recall), ROC-AUC (one-vs-rest, macro),
    per-class P/R/F1/AUC/support, confusion."""
    num_classes = probs.shape[1]
    y_pred = probs.argmax(1)
    labels = np.arange(num_classes)
    with warnings.catch_warnings():  # classes absent from a small split are expected, not news
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0)
        auc = one_vs_rest_auc(y_true, probs)
        return {
            "acc": float(accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "acsa": float(balanced_accuracy_score(y_true, y_pred)),
            "auc_macro": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
            "precision": precision, "recall": recall, "f1": f1, "auc": auc, "support": support,
            "confusion": confusion_matrix(y_true, y_pred, labels=labels),
        }


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC-AUC of each class against the rest; NaN for a class with no positive or no negative image here.
    Their mean is scikit-learn's multi_class="ovr", average="macro" when every class is present, and
    still defined on a split that lacks a class (where scikit-learn raises)."""
    auc = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        positive = y_true == c
        if 0 < positive.sum() < len(y_true):
            auc[c] = roc_auc_score(positive, probs[:, c])
    return auc


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Cross entropy of probabilities (of the TTA average, when on)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
