"""Every registered name builds and trains a step; unknown names fail listing the valid ones."""
import numpy as np
import pytest
import torch
from sklearn.metrics import recall_score

from conftest import TINY_MODEL
from datasets import build_sampler
from losses import LOSSES, build_loss
from models import build_model
from optim import OPTIMIZERS, SAM, SCHEDULERS, build_optimizer, build_scheduler, is_per_epoch
from utils import UserError
from utils.metrics import classification_metrics


def _batch(n=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def _changed(before, model) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_a_step(name, soft):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, 4)
    loss_fn = build_loss(name, class_counts=[5, 1, 3, 2])
    if soft and not loss_fn.soft_targets:
        pytest.skip(f"{name} takes class indices only (train.py refuses mixup with it)")
    x, y = _batch()
    target = torch.softmax(torch.randn(8, 4), 1) if soft else y
    optimizer = build_optimizer("sgd", model, lr=0.1, weight_decay=0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_fn(model(x).float(), target)
    loss.backward()
    optimizer.step()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert _changed(before, model)


@pytest.mark.parametrize("sam", [False, True], ids=["plain", "sam"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_a_step(name, sam):
    from optim.stepper import Stepper
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, 4)
    optimizer = build_optimizer(name, model, lr=1e-2, weight_decay=0.05)
    scheduler = build_scheduler("none", optimizer)
    stepper = Stepper(model, build_loss("ce"), optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                      torch.device("cpu"), sam=SAM(optimizer, 0.05) if sam else None)
    before = [p.detach().clone() for p in model.parameters()]
    loss = stepper.step([_batch()])
    assert torch.isfinite(loss) and _changed(before, model)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for pname, p in model.named_parameters():  # no weight decay on biases and norm weights
        assert (id(p) in no_decay) == (p.ndim <= 1), pname


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_steps_channels_last_weights_alike(name):
    """On CUDA train.py keeps the model channels_last; each optimizer takes the same step as on contiguous weights."""
    x, y = _batch()
    x, after = x.double(), []  # float64: the two formats' convolutions sum in different orders
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = build_model(TINY_MODEL, 4).double().to(memory_format=fmt)
        optimizer = build_optimizer(name, model, lr=1e-2, weight_decay=0.05)
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)), y).backward()
            optimizer.step()
        after.append([p.detach().clone() for p in model.parameters()])
    assert any(p.ndim == 4 and not p.is_contiguous() for p in model.parameters())  # the case that broke adamp 0.3
    if name == "lion":
        return  # it steps; but its update is sign(grad), so a gradient of rounding size flips a whole lr step
    for a, b in zip(*after):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_steps(name):
    model = build_model(TINY_MODEL, 4)
    optimizer = build_optimizer("sgd", model, lr=0.1, weight_decay=0)
    scheduler = build_scheduler(name, optimizer, epochs=3, steps_per_epoch=4, warmup_epochs=1, step_size=1, gamma=0.5)
    lrs = []
    for step in range(12):
        optimizer.step()
        if not is_per_epoch(scheduler):
            scheduler.step()
        elif step % 4 == 3:  # plateau: once per epoch, on the monitored metric
            scheduler.step(0.5)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(np.isfinite(lrs)) and all(0 <= lr <= 0.1 + 1e-12 for lr in lrs)


@pytest.mark.parametrize("build,name", [(build_loss, "focal_typo"), (lambda n: build_optimizer(n, None, 1, 0), "adamz"),
                                        (lambda n: build_scheduler(n, None), "cosin"),
                                        (lambda n: build_sampler(n, np.zeros(3, int), 0), "balanced")])
def test_unknown_names_list_valid_ones(build, name):
    with pytest.raises(KeyError, match="known: \\["):
        build(name)


def test_unknown_model_suggests_names():
    with pytest.raises(UserError, match="resnet18"):
        build_model("resnet181", 3)


def test_pretrained_path_loads_local_weights(tmp_path):
    from safetensors.torch import save_file
    source = build_model(TINY_MODEL, 5)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    same = build_model(TINY_MODEL, 5, pretrained_path=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), same.state_dict().values()))
    other = build_model(TINY_MODEL, 3, pretrained_path=str(tmp_path / "w.safetensors")).state_dict()
    for name, tensor in source.state_dict().items():  # all but the 5-class head carried over
        assert torch.equal(other[name], tensor) if not name.startswith("fc.") else other[name].shape[0] == 3
    with pytest.raises(UserError, match="no such file"):
        build_model(TINY_MODEL, 3, pretrained_path=str(tmp_path / "none.pth"))
    save_file(build_model("resnet10t", 5).state_dict(), tmp_path / "other.safetensors")  # another architecture
    with pytest.raises(UserError, match=r"\d+ of this model's \d+ tensors \(\d+%\) fit it; .*another architecture"):
        build_model(TINY_MODEL, 3, pretrained_path=str(tmp_path / "other.safetensors"))


def test_metrics_on_an_imbalanced_case():
    y = np.array([0] * 8 + [1] * 2)
    pred = np.array([0] * 8 + [0, 1])                      # class 1 half recalled
    probs = np.eye(2)[pred] * 0.8 + 0.1
    m = classification_metrics(y, probs)
    assert m["acc"] == 0.9
    assert m["acsa"] == pytest.approx((1.0 + 0.5) / 2) == recall_score(y, pred, average="macro")
    f1_0, f1_1 = 2 * 8 / (2 * 8 + 1), 2 * 1 / (2 * 1 + 1)  # 2TP / (2TP + FP + FN)
    assert m["f1_macro"] == pytest.approx((f1_0 + f1_1) / 2)
    assert m["confusion"].tolist() == [[8, 0], [1, 1]] and m["support"].tolist() == [8, 2]


def test_fixed_grid_models_are_built_for_the_image_size(tmp_path):
    """EfficientFormerV2 (in the sweep's backbone list) only runs at the size it was built for."""
    from models import check_input_size
    from models.checkpoint import CheckpointKeeper, load_model
    model = build_model("efficientformerv2_s0", 3, img_size=64)
    check_input_size(model, "efficientformerv2_s0", 64)
    with pytest.raises(UserError, match="cannot take --img_size 48"):
        check_input_size(build_model("efficientformerv2_s0", 3, img_size=48), "efficientformerv2_s0", 48)
    meta = dict(model="efficientformerv2_s0", classes=["a", "b", "c"], img_size=64)
    CheckpointKeeper(tmp_path, 0, True).update(model, meta, 1, 0.5)
    rebuilt, _ = load_model(tmp_path / "best.safetensors")  # rebuilt at the checkpoint's size
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-5)
