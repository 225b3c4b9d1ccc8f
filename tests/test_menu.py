"""The sweepable menu computes what it claims: losses, SAM/ASAM, schedules, sampler, augmentation strength, TTA."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets import build_sampler
from datasets.transforms import AUGS, TTA, eval_transform, seed_pipeline
from losses import LOSSES, build_loss, soft_target_losses, weights_for
from optim import SAM, build_scheduler, scheduler_kwargs
from optim.stepper import Stepper
from workflows.inference import predict_probs

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _logits(n=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


# ----------------------------------------------------------------------------- losses
def test_focal_with_gamma_zero_is_cross_entropy():
    logits, y = _logits()
    focal = build_loss("focal", focal_gamma=0.0)
    assert torch.allclose(focal(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    # and gamma > 0 down-weights the easy (confident, right) examples more than the hard ones
    easy, hard = torch.tensor([[6.0, 0, 0]]), torch.tensor([[0.5, 0, 0]])
    ratio = lambda x: build_loss("focal", focal_gamma=2.0)(x, torch.tensor([0])) / F.cross_entropy(x, torch.tensor([0]))
    assert ratio(easy) < ratio(hard) < 1


def test_weighted_ce_uniform_counts_is_ce_and_weights_follow_counts():
    logits, y = _logits()
    uniform = build_loss("weighted_ce", class_counts=[7] * 5, class_weights="inverse")
    assert torch.allclose(uniform(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    counts = [100, 10, 1]
    inv, sq, eff = (weights_for(counts, s, beta=0.9) for s in ("inverse", "sqrt_inverse", "effective"))
    assert torch.allclose(inv / inv[0], torch.tensor([1.0, 10, 100]))
    assert torch.allclose(sq / sq[0], torch.tensor([1.0, 10 ** 0.5, 10]))
    n = torch.tensor(counts, dtype=torch.float64)
    assert torch.allclose(eff / eff[0], ((1 - 0.9) / (1 - 0.9 ** n) / ((1 - 0.9) / (1 - 0.9 ** 100))).float())
    for w in (inv, sq, eff):
        assert w.mean().item() == pytest.approx(1.0)
    weighted = build_loss("weighted_ce", class_counts=[4, 1, 2, 8, 3], class_weights="inverse")
    w = weights_for([4, 1, 2, 8, 3], "inverse")
    by_hand = (w[y] * -logits.log_softmax(1)[torch.arange(len(y)), y]).sum() / w[y].sum()
    assert torch.allclose(weighted(logits, y), by_hand, atol=1e-6)


def test_label_smoothing():
    logits, y = _logits()
    assert torch.allclose(build_loss("label_smoothing", label_smoothing=0.0)(logits, y), F.cross_entropy(logits, y))
    log_p = logits.log_softmax(1)
    by_hand = (0.9 * -log_p[torch.arange(len(y)), y] + 0.1 * -log_p.mean(1)).mean()
    assert torch.allclose(build_loss("label_smoothing", label_smoothing=0.1)(logits, y), by_hand, atol=1e-6)


@pytest.mark.parametrize("name", soft_target_losses())
def test_soft_target_losses_agree_on_one_hot_targets(name):
    logits, y = _logits()
    loss_fn = build_loss(name, class_counts=[3, 1, 4, 1, 5], focal_alpha=True)
    assert torch.allclose(loss_fn(logits, y), loss_fn(logits, F.one_hot(y, 5).float()), atol=1e-6)


def test_only_asl_refuses_soft_targets():
    assert sorted(set(LOSSES) - set(soft_target_losses())) == ["asl"]


def test_soft_f1_is_bounded_and_falls_as_predictions_improve():
    _, y = _logits(n=40)
    loss_fn = build_loss("soft_f1")
    values = [loss_fn(k * F.one_hot(y, 5).float(), y).item() for k in (-8, -2, 0, 1, 2, 4, 8, 16)]
    assert all(0 <= v <= 1 for v in values)
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[0] > 0.95 and values[-1] < 1e-3


# ----------------------------------------------------------------------------- SAM / ASAM
def _ce_grad(params, x, y):
    w, b = params
    return torch.autograd.grad(F.cross_entropy(x @ w.T + b, y), [w, b])


def _stepper(model, optimizer, sam=None, clip=0.0, scaler=None, loss_fn=None):
    return Stepper(model, loss_fn or nn.CrossEntropyLoss(), optimizer, build_scheduler("none", optimizer),
                   scaler or torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), sam=sam, clip_grad=clip)


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_an_epoch_without_a_terminal_prints_its_progress(monkeypatch, capsys):
    """Output to a file, nohup or a notebook's !python: no progress bar, so a line now and then (step, loss, lr,
    img/s, time left), not minutes of silence."""
    from optim import stepper as stepper_module
    monkeypatch.setattr(stepper_module, "PROGRESS_EVERY_S", 0.0)
    model = nn.Linear(6, 3)
    loader = [(*_data(4, seed), None) for seed in range(6)]
    loss = stepper_module.train_one_epoch(_stepper(model, torch.optim.SGD(model.parameters(), lr=0.05)), loader,
                                          desc="epoch 1")
    lines = [line for line in capsys.readouterr().out.splitlines() if "batch" in line]
    assert len(lines) == 6 and lines[-1].startswith("  epoch 1 batch 6/6 | loss ")
    assert "| lr 0.05 | " in lines[0] and " img/s | " in lines[0] and lines[0].endswith(" s left")
    assert float(lines[-1].split("loss ")[1].split(" ")[0]) == pytest.approx(loss, abs=1e-4)


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["no-clip", "clip"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_sam_step_equals_the_two_step_update_by_hand(adaptive, clip):
    torch.manual_seed(0)
    model, (x, y), rho, lr = nn.Linear(6, 3), _data(), 0.3, 0.5
    w = [p.detach().clone().requires_grad_() for p in model.parameters()]
    g = _ce_grad(w, x, y)
    t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in w]          # ASAM: T_w = |w|
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))          # ||T_w g||
    e = [rho * ti ** 2 * gi / norm for ti, gi in zip(t, g)]                          # rho T_w^2 g / ||T_w g||
    g2 = _ce_grad([(p + ei).detach().requires_grad_() for p, ei in zip(w, e)], x, y)
    if clip:
        coef = min(1.0, clip / (torch.sqrt(sum((gi ** 2).sum() for gi in g2)).item() + 1e-6))
        g2 = [gi * coef for gi in g2]
    expected = [p.detach() - lr * gi for p, gi in zip(w, g2)]

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    _stepper(model, optimizer, SAM(optimizer, rho, adaptive), clip).step([(x, y)])
    for p, want in zip(model.parameters(), expected):
        assert torch.allclose(p, want, atol=1e-6)


def test_sam_with_accumulation_equals_one_big_batch():
    x, y = _data(8)
    results = []
    for batches in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        _stepper(model, optimizer, SAM(optimizer, 0.2)).step(batches)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the skipped step
def test_sam_under_grad_scaler_matches_unscaled_and_survives_overflow():
    x, y = _data(8)

    def run(scaler, loss_fn=None):
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        sam = SAM(optimizer, 0.2, adaptive=True)
        _stepper(model, optimizer, sam, clip=0.1, scaler=scaler, loss_fn=loss_fn).step([(x, y)])
        return [p.detach().clone() for p in model.parameters()]

    plain, scaled = run(None), run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    for a, b in zip(plain, scaled):
        assert torch.allclose(a, b, atol=1e-6)
    # scaled gradients that overflow (as fp16 ones do): no perturbation, the step is skipped, the scale backs off
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    torch.manual_seed(0)
    start = [p.detach().clone() for p in nn.Linear(6, 3).parameters()]
    after = run(scaler, loss_fn=lambda logits, y: F.cross_entropy(logits, y) * 2.0 ** 40)
    assert all(torch.equal(a, b) for a, b in zip(start, after))
    assert scaler.get_scale() == 2.0 ** 99


def test_sam_second_pass_leaves_batchnorm_statistics_alone():
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 2, (8,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    reference(x)  # one training-mode forward: what the running statistics should see
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _stepper(model, optimizer, SAM(optimizer, 0.5)).step([(x, y)])
    assert torch.allclose(model[1].running_mean, reference[1].running_mean)
    assert torch.allclose(model[1].running_var, reference[1].running_var)
    assert model[1].momentum == 0.1


# ----------------------------------------------------------------------------- schedules
def _lrs(name, steps_per_epoch=10, epochs=4, metric=None, **kw):
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    scheduler = build_scheduler(name, optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch, **kw)
    lrs = []
    for step in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if metric is None:
            scheduler.step()
        elif step % steps_per_epoch == steps_per_epoch - 1:
            scheduler.step(metric)
    return np.array(lrs)


def test_cosine_warms_up_then_decays_to_zero():
    lrs = _lrs("cosine", warmup_epochs=1)
    assert np.allclose(lrs[:10], 0.1 * np.arange(10) / 10)  # timm's warm-up, from --warmup_lr 0
    assert lrs[10] == pytest.approx(0.1) and np.all(np.diff(lrs[10:]) < 0) and lrs[-1] < 0.001
    assert np.allclose(lrs[10:], 0.05 * (1 + np.cos(np.pi * np.arange(30) / 30)))


def test_a_one_epoch_run_is_not_all_warm_up(capsys):
    from workflows.config import Config
    kwargs = scheduler_kwargs(Config(epochs=1, warmup_epochs=1.0), steps_per_epoch=10)
    assert kwargs["warmup_epochs"] == pytest.approx(0.2) and "warm-up cut to 0.2 of 1 epochs" in capsys.readouterr().out
    assert scheduler_kwargs(Config(epochs=12, warmup_epochs=1.0), 10)["warmup_epochs"] == 1.0
    assert scheduler_kwargs(Config(epochs=1, scheduler="onecycle", warmup_epochs=0.5), 10)["warmup_epochs"] == 0.5


def test_step_onecycle_and_plateau_schedules():
    step = _lrs("step", step_size=2, gamma=0.1)
    assert np.allclose(step[:20], 0.1) and np.allclose(step[20:], 0.01)
    one = _lrs("onecycle", warmup_epochs=1)
    assert one.max() == pytest.approx(0.1) and np.argmax(one) in (9, 10) and one[0] < 0.01 and one[-1] < 1e-4
    flat = _lrs("plateau", metric=0.5, plateau_patience=1, gamma=0.5)
    assert np.allclose(flat[:30], 0.1) and np.allclose(flat[30:], 0.05)  # epochs 1-2 no better than 1, drop after 3


# ----------------------------------------------------------------------------- sampler
def test_imbalanced_sampler_balances_a_subset_and_is_seeded():
    labels = np.array([0] * 3000 + [1] * 300 + [2] * 50)
    subset = np.r_[np.arange(1000), np.arange(3000, 3100)]  # a fold-like subset, 10:1
    sampler = build_sampler("imbalanced", labels[subset], seed=3)
    drawn = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        drawn.append([i for i, _ in sampler])
    picked = labels[subset][np.concatenate(drawn)]
    assert len(drawn[0]) == len(subset) and set(picked) == {0, 1}
    assert 0.45 < picked.mean() < 0.55  # class 1 is drawn as often as class 0
    assert drawn[0] != drawn[1]
    again = build_sampler("imbalanced", labels[subset], seed=3)
    again.set_epoch(2)
    assert [i for i, _ in again] == drawn[1]
    plain = build_sampler("random", labels[subset], seed=3)
    assert sorted(i for i, _ in plain) == list(range(len(subset)))


# ----------------------------------------------------------------------------- augmentation strength
def _images(n=12):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("preset", sorted(AUGS))
def test_strength_zero_is_resize_and_normalize_only(preset):
    ref = eval_transform(24, MEAN, STD)
    aug = AUGS[preset](24, 0.0, MEAN, STD)
    for i, image in enumerate(_images()):
        seed_pipeline(aug, i)
        assert torch.equal(aug(image=image)["image"], ref(image=image)["image"])


@pytest.mark.parametrize("preset", sorted(set(AUGS) - {"none"}))
def test_strength_one_changes_every_image(preset):
    ref = eval_transform(24, MEAN, STD)
    aug = AUGS[preset](24, 1.0, MEAN, STD)
    for i, image in enumerate(_images()):
        seed_pipeline(aug, i)
        assert not torch.allclose(aug(image=image)["image"], ref(image=image)["image"], atol=1e-3), i


def test_strength_scales_how_much_images_change():
    ref = eval_transform(24, MEAN, STD)
    images = _images(24)

    def mean_change(strength):
        aug = AUGS["test_noise"](24, strength, MEAN, STD)
        seed_pipeline(aug, 0)
        return np.mean([(aug(image=im)["image"] - ref(image=im)["image"]).abs().mean().item() for im in images])
    changes = [mean_change(s) for s in (0.0, 0.1, 0.5, 1.0)]
    assert changes[0] == 0 and changes[1] < changes[2] < changes[3], changes


# ----------------------------------------------------------------------------- TTA
def _loader(n=10, size=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    return [(images[:6], None, None), (images[6:], None, None)]


@pytest.mark.parametrize("tta", sorted(TTA))
def test_tta_on_a_symmetric_model_equals_no_tta(tta):
    torch.manual_seed(0)
    symmetric = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    base = predict_probs(symmetric, _loader(), torch.device("cpu"))
    assert np.allclose(predict_probs(symmetric, _loader(), torch.device("cpu"), tta=tta), base, atol=1e-6)
    assert np.allclose(base.sum(1), 1, atol=1e-6)


def test_tta_averages_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    loader = _loader()
    model(loader[0][0])
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        by_hand = np.mean([model(torch.rot90(x, k, (-2, -1))).softmax(1).numpy() for k in range(4)], axis=0)
    got = predict_probs(model, loader, torch.device("cpu"), tta="rot4")
    assert np.allclose(got, by_hand, atol=1e-6)
    assert not np.allclose(got, predict_probs(model, loader, torch.device("cpu")), atol=1e-3)
    views = torch.stack([v(x) for v in TTA.build("d4")]).flatten(1)
    assert len({tuple(np.round(v[:50].numpy(), 5)) for v in views}) == 8  # eight distinct views
    assert math.isclose(float(views.sum()), float(8 * x.sum()), rel_tol=1e-4)


def test_bench_reports_every_variant():
    from workflows.bench import step_costs
    rows = step_costs("test_resnet", 16, 8, steps=1, device=torch.device("cpu"))
    assert [r[0] for r in rows] == ["plain", "SAM", "ASAM", "EMA", "SAM + EMA", "accum 2 x half batch",
                                    "EMA update alone"]
    assert all(ms > 0 for _, ms, _, _ in rows) and rows[0][2] == 1.0


def test_pipeline_bench_reports_loader_and_ceiling():
    from workflows.bench import pipeline_figures
    f = pipeline_figures("test_resnet", 16, 8, steps=2, device=torch.device("cpu"), workers=0)
    assert f["train_real"] > 0 and f["train_ceiling"] > 0 and f["loader"] > 0
    assert f["ratio"] == pytest.approx(f["train_real"] / f["train_ceiling"])


def test_timm_parameter_groups_layer_decay_and_schedule_bounds():
    """Optimizers come from timm's factory: the model's no_weight_decay() names take no decay, --layer_decay gives
    deeper layers smaller lrs (the head keeps --lr); cosine starts at --warmup_lr and ends at --min_lr."""
    from models import build_model
    from optim import build_optimizer
    model = build_model("test_vit", 3)
    optimizer = build_optimizer("adamw", model, lr=0.1, weight_decay=0.05, layer_decay=0.5)
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert len(lrs) > 2 and lrs[-1] == pytest.approx(0.1) and lrs[0] < 0.1 * 0.5 ** 2
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert all("lr_scale" not in g for g in optimizer.param_groups)
    lrs = _lrs("cosine", warmup_epochs=1, warmup_lr=0.02, min_lr=0.005)
    assert lrs[0] == pytest.approx(0.02) and lrs[10] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.005, abs=1e-3)
