"""Every registered name builds and trains a step; unknown names fail listing the valid ones."""
import numpy as np
import pytest
import torch
from sklearn.metrics import recall_score

from conftest import TINY_MODEL
from losses import LOSSES, build_loss
from models import build_model
from optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler
from utils import UserError
from utils.metrics import classification_metrics


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
def test_every_combination_takes_a_step(loss, opt, sched):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, 4)
    optimizer = build_optimizer(opt, model, lr=1e-2, weight_decay=0.05)
    scheduler = build_scheduler(sched, optimizer, total_steps=10)
    before = [p.detach().clone() for p in model.parameters()]
    loss_value = build_loss(loss)(model(torch.randn(8, 3, 32, 32)).float(), torch.randint(0, 4, (8,)))
    loss_value.backward()
    optimizer.step()
    scheduler.step()
    assert torch.isfinite(loss_value)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_no_weight_decay_on_biases_and_norms():
    model = build_model(TINY_MODEL, 4)
    groups = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == (p.ndim <= 1), name


@pytest.mark.parametrize("build,name", [(build_loss, "focal_typo"), (lambda n: build_optimizer(n, None, 1, 0), "adamz"),
                                        (lambda n: build_scheduler(n, None, 1), "cosin")])
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
