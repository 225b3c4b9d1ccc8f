"""The menu through train.py itself: every loss, every optimizer (adamw, adamp, sgd+SAM) and both samplers train a
short digits epoch to a finite loss; mixup, EMA, early stopping and the start-up refusals work end to end.

Runs train.main in-process with W&B disabled (the W&B path is covered by test_train_e2e.py), on a
small competition folder built from real digits images.
"""
import numpy as np
import pytest
import torch

import train
from conftest import TINY_MODEL, make_competition_folder
from losses import LOSSES
from models.checkpoint import load_checkpoint, read_meta

pytestmark = pytest.mark.slow

OPTIMIZERS = {"adamw": ["--optimizer=adamw"], "adamp": ["--optimizer=adamp"],
              "sgd+sam": ["--optimizer=sgd", "--sam=True", "--lr=0.05"]}


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return make_competition_folder(tmp_path_factory.mktemp("menu") / "digits", n_train=200, n_test=30)


def train_run(data, out, *extra) -> int:
    return train.main(["--data", str(data), "--model", TINY_MODEL, "--img_size=24", "--batch_size=32", "--workers=0",
                       "--epochs=1", "--table_rows=0", "--keep_top_k=0", "--wandb_mode=disabled", f"--out_dir={out}",
                       *extra])


def menu_runs() -> list[tuple[str, str, str]]:
    """Every loss once, the optimizers and samplers in turn beside them: each value of each menu trains (the
    registries' own tests check every one by itself; all 36 combinations would add runs, not coverage)."""
    optimizers, samplers = sorted(OPTIMIZERS), ["random", "imbalanced"]
    return [(loss, optimizers[i % len(optimizers)], samplers[i % len(samplers)])
            for i, loss in enumerate(sorted(LOSSES))]


def test_the_menu_runs_cover_every_value():
    runs = menu_runs()
    assert {r[0] for r in runs} == set(LOSSES) and {r[1] for r in runs} == set(OPTIMIZERS)
    assert {r[2] for r in runs} == {"random", "imbalanced"}


@pytest.mark.parametrize("loss,optimizer,sampler", menu_runs())
def test_every_loss_optimizer_sampler_trains_an_epoch(digits_folder, tmp_path, loss, optimizer, sampler):
    assert train_run(digits_folder, tmp_path, f"--loss={loss}", f"--sampler={sampler}", *OPTIMIZERS[optimizer]) == 0
    meta = read_meta(tmp_path / "last.safetensors")
    assert meta["config"]["loss"] == loss and meta["config"]["sampler"] == sampler
    assert np.isfinite(meta["metrics"]["train/loss"]) and np.isfinite(meta["metrics"]["val/loss"])
    assert (tmp_path / "submission.csv").exists()


def test_everything_at_once(digits_folder, tmp_path):
    """Mixup + cutmix with a soft-target loss, EMA, accumulation, clipping, ASAM, one-cycle, TTA, drop path."""
    rc = train_run(digits_folder, tmp_path, "--epochs=2", "--loss=label_smoothing", "--mixup=0.4", "--cutmix=1.0",
                   "--ema=True", "--accum_steps=2", "--clip_grad=1.0", "--sam=True", "--sam_adaptive=True",
                   "--sam_rho=0.5", "--scheduler=onecycle", "--warmup_epochs=0.5", "--tta=d4", "--drop_rate=0.1",
                   "--drop_path_rate=0.05", "--aug_preset=test_noise", "--aug_strength=0.8", "--sampler=imbalanced")
    assert rc == 0
    meta = read_meta(tmp_path / "last.safetensors")
    assert meta["epoch"] == 2 and all(np.isfinite(v) for v in meta["metrics"].values())


def test_ema_weights_are_the_checkpointed_ones(digits_folder, tmp_path):
    assert train_run(digits_folder, tmp_path / "plain", "--epochs=2") == 0
    assert train_run(digits_folder, tmp_path / "ema", "--epochs=2", "--ema=True", "--ema_decay=0.9") == 0
    plain, _ = load_checkpoint(tmp_path / "plain" / "last.safetensors")
    ema, _ = load_checkpoint(tmp_path / "ema" / "last.safetensors")
    # same seed, same training trajectory: only the averaging can make the saved weights differ
    differ = [k for k in plain if plain[k].is_floating_point() and not torch.equal(plain[k], ema[k])]
    assert len(differ) > len(plain) // 2


def test_early_stopping(digits_folder, tmp_path):
    # a LayerNorm model at a negligible lr: the score cannot improve after epoch 1
    assert train_run(digits_folder, tmp_path, "--model=test_vit", "--img_size=32", "--lr=1e-12", "--epochs=6",
                     "--patience=2") == 0
    meta = read_meta(tmp_path / "last.safetensors")
    assert meta["epoch"] == 3 and read_meta(tmp_path / "best.safetensors")["epoch"] == 1


def test_a_size_the_model_cannot_take_fails_before_training(digits_folder, tmp_path, capsys):
    assert train_run(digits_folder, tmp_path, "--model=test_vit", "--img_size=24") == 1
    assert "cannot take --img_size 24" in capsys.readouterr().err
    assert not (tmp_path / "last.safetensors").exists()


def test_hard_label_loss_refuses_mixup(digits_folder, tmp_path, capsys):
    assert train_run(digits_folder, tmp_path, "--loss=asl", "--mixup=0.2") == 1
    err = capsys.readouterr().err
    assert "--loss asl takes class indices only" in err and "soft_f1" in err
    assert not (tmp_path / "last.safetensors").exists()


@pytest.mark.parametrize("flag,shown", [("--loss=focall", "soft_f1"), ("--optimizer=adamq", "sgdp"),
                                        ("--scheduler=cosin", "onecycle"), ("--sampler=balanced", "imbalanced"),
                                        ("--tta=d8", "rot4"), ("--aug_preset=heavy", "test_noise"),
                                        ("--class_weights=log", "effective")])
def test_unknown_names_fail_at_start_up_listing_valid_ones(tmp_path, capsys, flag, shown):
    with pytest.raises(SystemExit) as exit_info:
        train.main([flag, f"--out_dir={tmp_path / 'out'}"])
    assert exit_info.value.code == 2 and shown in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
