"""Classification metrics from scikit-learn. Usage: m = classification_metrics(y_true, probs)"""
import warnings

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """acc, macro-F1, ACSA (balanced accuracy: mean per-class recall), per-class P/R/F1/support, confusion."""
    num_classes = probs.shape[1]
    y_pred = probs.argmax(1)
    labels = np.arange(num_classes)
    with warnings.catch_warnings():  # classes absent from a small split are expected, not news
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0)
        return {
            "acc": float(accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "acsa": float(balanced_accuracy_score(y_true, y_pred)),
            "precision": precision, "recall": recall, "f1": f1, "support": support,
            "confusion": confusion_matrix(y_true, y_pred, labels=labels),
        }
