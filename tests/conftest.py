"""Shared fixtures: every W&B directory in a temp path, real offline mode; small real image folders."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY_MODEL = "test_resnet"  # a real timm architecture with ~0.4M parameters, random init


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    wandb_root = tmp_path / "wandb-home"
    for key, sub in [("WANDB_DIR", "dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config")]:
        (wandb_root / sub).mkdir(parents=True)
        monkeypatch.setenv(key, str(wandb_root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(wandb_root / "no-netrc"))
    monkeypatch.setenv("SWEEPCLS_CACHE_DIR", str(tmp_path / "image-cache"))  # --cache disk files: per test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # --pretrained auto: never a download in a test
    monkeypatch.setenv("SWEEPCLS_WEIGHTS_DIR", str(tmp_path / "weights"))  # ... and no weights but a test's own
    return wandb_root


def _digit_images(n: int, seed: int = 0):
    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(digits.target), size=n, replace=False)
    images = [cv2.resize((digits.images[i] * 255 / 16).astype(np.uint8), (32, 32)) for i in idx]
    return images, digits.target[idx]


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def make_competition_folder(root: Path, n_train=240, n_test=40, name_labels=False, with_meta=True, groups=False):
    """train.csv (ID,target[,group]) + train/ + meta.csv + sample_submission.csv + test/, from real digits."""
    images, labels = _digit_images(n_train + n_test)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "target"] + (["group"] if groups else []))
        for i in range(n_train):
            cv2.imwrite(str(root / "train" / f"tr_{i:04d}.png"), images[i])
            label = NAMES[labels[i]] if name_labels else int(labels[i])
            w.writerow([f"tr_{i:04d}.png", label] + ([f"person{i // 6}"] if groups else []))
    if with_meta:
        with open(root / "meta.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["target", "class_name"]] + [[i, n] for i, n in enumerate(NAMES)])
    test_ids = [f"te_{i:04d}.png" for i in range(n_test)]
    for i, tid in enumerate(test_ids):
        cv2.imwrite(str(root / "test" / tid), images[n_train + i])
    order = np.random.default_rng(1).permutation(n_test)  # not sorted: the submission must keep this order
    with open(root / "sample_submission.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["ID", "target"]] + [[test_ids[i], 0] for i in order])
    return root


@pytest.fixture
def competition(tmp_path):
    return make_competition_folder(tmp_path / "comp")


def read_run(run_dir: Path) -> list[dict]:
    """All records of an offline run, read with wandb's own reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_train(args: list[str], cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True,
                          env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
