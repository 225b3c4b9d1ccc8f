"""avg_checkpoints.py, in-process: a run dir's kept epochs ranked by its monitor and averaged tensor by tensor, the
result a checkpoint every command loads; mismatched or too few checkpoints are one error line."""
import torch
from test_ensemble import save_checkpoint

import avg_checkpoints
from models.checkpoint import checkpoint_bytes, load_checkpoint, load_model
from utils.files import atomic_write_bytes


def epoch_file(run_dir, epoch: int, score: float, shift: float, mode: str = "auto"):
    """A copy of the tiny checkpoint as epoch-NNN with its float weights moved by `shift` and its monitor's score."""
    base = save_checkpoint(run_dir / "base.safetensors", ["a", "b"])
    state, meta = load_checkpoint(base)
    state = {k: v + shift if v.is_floating_point() else v + epoch for k, v in state.items()}
    meta = {**meta, "epoch": epoch, "metrics": {"val/loss": score}, "config": {"monitor": "val/loss",
                                                                                "monitor_mode": mode}}
    path = run_dir / f"epoch-{epoch:03d}.safetensors"
    atomic_write_bytes(path, checkpoint_bytes(state, meta))
    return path, state


def test_a_run_dirs_best_epochs_are_averaged(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    files = {e: epoch_file(run, e, score, shift) for e, score, shift in [(3, 0.9, 0.0), (5, 0.2, 1.0), (7, 0.4, 3.0)]}
    assert avg_checkpoints.main([str(run), "--top", "2"]) == 0  # val/loss: lower is better, so epochs 5 and 7
    state, meta = load_checkpoint(run / "averaged.safetensors")
    five, seven = files[5][1], files[7][1]
    name = next(k for k, v in five.items() if v.is_floating_point() and v.numel() > 1)
    assert torch.allclose(state[name], (five[name] + seven[name]) / 2)
    counter = next(k for k, v in five.items() if not v.is_floating_point())  # num_batches_tracked: the best's
    assert torch.equal(state[counter], five[counter]) and state[counter].dtype == five[counter].dtype
    assert [s["epoch"] for s in meta["averaged_from"]] == [5, 7] and meta["epoch"] == 5
    model, _ = load_model(run / "averaged.safetensors")  # predict.py, validate.py, export.py load it as any other
    assert "averaged 2 checkpoints: epoch-005.safetensors (epoch 5), epoch-007.safetensors" in capsys.readouterr().out
    assert avg_checkpoints.main([str(run), "--out", str(tmp_path / "all.safetensors")]) == 0  # every kept epoch
    assert [s["epoch"] for s in load_checkpoint(tmp_path / "all.safetensors")[1]["averaged_from"]] == [5, 7, 3]


def test_mismatched_or_too_few_checkpoints_are_one_error_line(tmp_path, capsys):
    a = save_checkpoint(tmp_path / "a.safetensors", ["a", "b"])
    b = save_checkpoint(tmp_path / "b.safetensors", ["a", "c"])
    assert avg_checkpoints.main([str(a), str(b)]) == 1
    assert f"error: {b}: another classes than {a}" in capsys.readouterr().err
    assert avg_checkpoints.main([str(a)]) == 1
    assert "1 checkpoint to average; give two or more" in capsys.readouterr().err
    assert avg_checkpoints.main([str(tmp_path)]) == 1  # a folder with no epoch files
    assert "no epoch-NNN.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "averaged.safetensors").exists()
