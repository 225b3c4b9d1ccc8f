"""Checkpoints: self-contained rebuild, top-k retention that never loses the best, atomic writes."""
import json
import time

import pytest
import torch

from conftest import TINY_MODEL
from models import build_model
from models.checkpoint import CheckpointKeeper, load_checkpoint, load_model, read_meta
from utils.background import BackgroundWriter
from utils.files import atomic_write_bytes


def meta_for(epoch):
    return {"model": TINY_MODEL, "classes": ["a", "b", "c"], "img_size": 32, "mean": [0.5] * 3,
            "std": [0.5] * 3, "epoch": epoch, "config": {"lr": 0.1}}


def test_rebuild_from_checkpoint_alone(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, 3).eval()
    CheckpointKeeper(tmp_path, keep_top_k=1, maximize=True).update(model, meta_for(1), 1, 0.5)
    rebuilt, meta = load_model(tmp_path / "best.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert meta == meta_for(1)
    assert json.loads(json.dumps(meta)) == meta  # JSON types only


@pytest.mark.parametrize("maximize", [True, False])
@pytest.mark.parametrize("background", [False, True])
def test_top_k_keeps_best_and_last(tmp_path, maximize, background):
    model = build_model(TINY_MODEL, 3)
    keeper = CheckpointKeeper(tmp_path, keep_top_k=2, maximize=maximize,
                              writer=BackgroundWriter("t") if background else None)
    scores = [0.3, 0.7, 0.5, 0.6, 0.2]
    flags = [keeper.update(model, meta_for(e), e, s) for e, s in enumerate(scores, 1)]
    keeper.flush()
    order = sorted(range(1, 6), key=lambda e: scores[e - 1], reverse=maximize)
    best = order[0]
    assert keeper.best_epoch == best and read_meta(tmp_path / "best.safetensors")["epoch"] == best
    assert read_meta(tmp_path / "last.safetensors")["epoch"] == 5
    kept = sorted(p.name for p in tmp_path.glob("epoch-*.safetensors"))
    assert kept == sorted(f"epoch-{e:03d}.safetensors" for e in order[:2])
    assert flags == [s == (max if maximize else min)(scores[:i + 1]) for i, s in enumerate(scores)]
    assert not list(tmp_path.glob(".*tmp*"))


def test_background_writes_the_weights_as_they_were(tmp_path):
    """The keeper copies the weights at update(); training that goes on meanwhile does not leak into the file."""
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    worker = BackgroundWriter("t")
    keeper = CheckpointKeeper(tmp_path, keep_top_k=1, maximize=True, writer=worker)
    worker.submit(lambda: time.sleep(0.3))  # the writer is busy: the file is written after the change below
    keeper.update(model, meta_for(1), 1, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    keeper.flush()
    saved, _ = load_checkpoint(tmp_path / "best.safetensors")
    assert all(torch.equal(saved[k], before[k]) for k in before)
    worker.close()


def test_keep_top_k_zero_keeps_only_best_and_last(tmp_path):
    model = build_model(TINY_MODEL, 3)
    keeper = CheckpointKeeper(tmp_path / "run", keep_top_k=0, maximize=True)
    for e, s in enumerate([0.9, 0.1, 0.2], 1):
        keeper.update(model, meta_for(e), e, s)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.safetensors", "last.safetensors"]
    assert read_meta(tmp_path / "run" / "best.safetensors")["epoch"] == 1


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]
