"""Labelled images in, train/val/test datasets out. Usage:
    data = load_data(cfg.data, image_col=..., label_col=..., group_col=...)
    train_idx, val_idx = split_indices(data.labels, data.groups, val_fraction=0.2, folds=0, fold=0, seed=42)
    ds = ImageDataset(data.items, data.labels, transform)

Sources: "digits" (scikit-learn's bundled digits, see datasets/digits.py), an ImageFolder tree
(PATH/<class>/* or PATH/train/<class>/* with optional PATH/test/), or a competition folder
(PATH/train.csv + PATH/train/, optional meta.csv, sample_submission.csv and PATH/test/).
"""
import os

# albumentations 2.x asks pypi.org for a newer version on every import (each run, each spawned loader worker):
# a network call at run time, and a warning on every run of an offline GPU server. Off unless the user sets it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# (set before the imports below, which import albumentations)

# the package face: the names the rest of the repo imports from `datasets`, one module per job
from datasets.files import IMAGE_EXTS, Data, load_image, read_csv, take, unreadable, write_csv  # noqa: F401
from datasets.readers import load_data  # noqa: F401
from datasets.samplers import SAMPLERS, ImageDataset, SeededSampler, build_sampler  # noqa: F401
from datasets.screening import screen_images  # noqa: F401
from datasets.splits import split_indices  # noqa: F401
from datasets.submission import write_oof, write_submission  # noqa: F401
