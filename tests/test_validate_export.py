"""validate.py and export.py, in-process through main(argv) on a tiny untrained checkpoint: the scores are
classification_metrics of the model's own probabilities, the data's classes are matched by name, the split is the one
asked for (and the model the one that split calls for); the exported file reproduces PyTorch's logits, and a file
that does not is refused."""
import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_ensemble import save_checkpoint

import export as export_cli
import validate as validate_cli
from models.checkpoint import load_model
from utils.metrics import classification_metrics

CLASSES = ["cat", "dog", "fox"]


def image_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/<i>.png: 32 px random images (the checkpoint's img_size: no resize)."""
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / name / f"{i}.png"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return root


def reference_probs(checkpoint: Path, files: list[Path]) -> np.ndarray:
    """The checkpoint's probabilities computed here, without sweepcls' loaders: RGB / 255, (x - mean) / std."""
    model, meta = load_model(checkpoint)
    x = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]).astype(np.float32) / 255
    x = (x - np.array(meta["mean"], np.float32)) / np.array(meta["std"], np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).softmax(1).numpy()


def validate(tmp_path, *argv) -> int:
    return validate_cli.main([str(a) for a in argv] + ["--cache_dir", str(tmp_path / "cache")])


def test_the_scores_are_the_metrics_of_the_models_probabilities_with_classes_matched_by_name(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", CLASSES)
    data = image_folder(tmp_path / "holdout", {"dog": 5, "fox": 4})  # the data's class 0 is the checkpoint's 1
    out_dir = tmp_path / "out"
    assert validate(tmp_path, checkpoint, "--data", data, "--out_dir", out_dir, "--tta", "none") == 0
    files = sorted((data / "dog").iterdir()) + sorted((data / "fox").iterdir())
    labels = np.array([1] * 5 + [2] * 4)
    probs = reference_probs(checkpoint, files)
    m = classification_metrics(labels, probs)
    rows = list(csv.DictReader(open(out_dir / "val_probs.csv")))
    assert [r["id"] for r in rows] == [f"{f.parent.name}/{f.name}" for f in files]
    assert [r["label"] for r in rows] == ["dog"] * 5 + ["fox"] * 4
    assert np.allclose([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], probs, atol=1e-5)
    saved = json.loads((out_dir / "metrics.json").read_text())
    for key in ("acc", "f1_macro", "acsa", "auc_macro"):
        assert saved[key] == pytest.approx(m[key], abs=1e-6), key
    assert saved["per_class"]["cat"]["support"] == 0 and saved["per_class"]["fox"]["support"] == 4
    assert saved["split"] == "all" and saved["images"] == 9
    out = capsys.readouterr().out.splitlines()
    assert "split auto: all (every labelled image: no labelled test/, no val/ folder, not the data the checkpoint " \
           "trained on)" in out
    line = next(x for x in out if x.startswith("m.safetensors (test_resnet, 32 px"))
    assert f"all/acc {m['acc']:.4f} | all/f1_macro {m['f1_macro']:.4f} | all/acsa {m['acsa']:.4f}" in line
    assert next(x for x in out if x.startswith("fox ")).split()[1:] == [f"{m['precision'][2]:.3f}",
                                                                       f"{m['recall'][2]:.3f}", f"{m['f1'][2]:.3f}",
                                                                       f"{m['auc'][2]:.3f}", "4"]
    assert out[-1] == f"results in {out_dir}/: report.html (open it in a browser), val_probs.csv, metrics.json"
    assert "9 images" in (out_dir / "report.html").read_text()


def test_a_class_the_checkpoint_does_not_know_is_one_error_line(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", CLASSES)
    data = image_folder(tmp_path / "holdout", {"cat": 2, "owl": 2})
    assert validate(tmp_path, checkpoint, "--data", data, "--out_dir", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: --data {data}: class(es) 'owl' not among the checkpoint's 3 classes "
                                f"['cat', 'dog', 'fox']; score it on images of the classes it knows"]
    assert not (tmp_path / "out").exists()


def test_the_split_is_the_one_asked_for_and_scored_with_the_model_it_calls_for(tmp_path, capsys):
    run = tmp_path / "run"
    save_checkpoint(run / "best.safetensors", CLASSES)
    save_checkpoint(run / "final" / "best.safetensors", CLASSES, img_size=40)  # told apart by its img_size
    data = tmp_path / "data"
    image_folder(data / "train", {"cat": 3, "dog": 3}, seed=1)
    image_folder(data / "val", {"cat": 2, "dog": 1}, seed=2)
    image_folder(data / "test", {"dog": 4}, seed=3)

    def scored(*flags) -> str:
        assert validate(tmp_path, run, "--data", data, "--out_dir", tmp_path / "out", *flags) == 0
        return next(x for x in capsys.readouterr().out.splitlines() if x.startswith("run "))

    assert "run (final fit) (test_resnet, 40 px, 1 checkpoint(s)) on 4 images (test)" in scored()  # predict.py's model
    assert "run (test_resnet, 32 px, 1 checkpoint(s)) on 3 images (val)" in scored("--split", "val")  # the holdout's
    assert "on 13 images (all)" in scored("--split", "all")
    shutil.rmtree(data / "test")
    assert "on 3 images (val)" in scored()
    assert validate(tmp_path, run, "--data", data, "--split", "test") == 1
    assert capsys.readouterr().err.startswith(f"error: --data {data}: no labelled test images")


def test_the_val_split_is_rebuilt_from_the_checkpoints_config_on_its_own_data(tmp_path, capsys):
    from datasets import split_indices
    data = image_folder(tmp_path / "data", {"cat": 6, "dog": 6, "fox": 6})
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", CLASSES)
    config = {"data": str(data), "val_fraction": 0.25, "folds": 0, "fold": 0, "seed": 3}
    from models.checkpoint import update_meta
    recorded = {"tta": "flip", "test_bn": "adapt", "asked": {"tta": "auto", "test_bn": "auto"},
                "why": {"tta": "kept on the test set", "test_bn": "the test set is shifted"}}
    update_meta(checkpoint, {"config": config, "test_time": recorded})  # decided for its test set
    assert validate(tmp_path, checkpoint, "--data", data, "--out_dir", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "split auto: val (the data the checkpoint trained on: the validation split its run held out)" in out
    assert "tta auto: none on the val split (as its run validated it; the decision its run recorded is for the test " \
           "set)" in out  # not the test set's recorded decision
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (saved["tta"], saved["test_bn"]) == ("none", "none")
    val = split_indices(np.repeat([0, 1, 2], 6), None, 0.25, 0, 0, 3)[1]
    ids = [f"{CLASSES[i // 6]}/{i % 6}.png" for i in val]
    assert [r["id"] for r in csv.DictReader(open(tmp_path / "out" / "val_probs.csv"))] == ids


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_the_exported_model_reproduces_the_pytorch_logits(tmp_path, capsys, fmt):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", CLASSES, img_size=48)
    out = tmp_path / "exp" / ("m.pt" if fmt == "torchscript" else "m.pt2")
    assert export_cli.main([str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    info = json.loads((tmp_path / "exp" / f"{out.name}.json").read_text())
    assert (info["classes"], info["img_size"], info["mean"], info["std"]) == (CLASSES, 48, [0.5] * 3, [0.25] * 3)
    assert info["input"]["layout"] == "NCHW" and info["input"]["range"] == [0.0, 1.0]
    assert info["parity"]["max_abs_logits"] <= 1e-4 and info["parity"]["atol"] == 1e-4
    model, _ = load_model(checkpoint)
    x = torch.rand(5, 3, 48, 48, generator=torch.Generator().manual_seed(7))  # not the batch size it was checked on
    loaded = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model((x - 0.5) / 0.25), atol=1e-4)
    printed = capsys.readouterr().out
    assert f"as {fmt} | parity on 3 random images: max abs diff logits" in printed
    assert printed.splitlines()[-1].startswith(f"results in {out.parent}/: {out.name}, {out.name}.json")


def test_an_export_that_does_not_match_pytorch_is_refused_and_not_written(tmp_path, capsys, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", CLASSES)
    load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: (lambda m: (lambda x: m(x) + 1e-3))(load(*a, **k)))
    out = tmp_path / "exp" / "m.pt"
    assert export_cli.main([str(checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: parity: the exported torchscript model's logits differ from "
                                               "PyTorch's by up to 0.001")
    assert "above --atol 0.0001; nothing was written" in err[0]
    assert list((tmp_path / "exp").iterdir()) == []  # neither the file nor its temporary


def test_onnx_without_its_packages_is_one_error_line(tmp_path, capsys):
    import importlib.util
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        pytest.skip("onnx is installed here")
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", CLASSES)
    assert export_cli.main([str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pip install onnx onnxscript" in err[0] and not (tmp_path / "m.onnx").exists()


def test_a_cross_validated_run_is_exported_one_fold_at_a_time(tmp_path, capsys):
    for k in range(2):
        save_checkpoint(tmp_path / "cv" / f"fold{k}" / "best.safetensors", CLASSES)
    assert export_cli.main([str(tmp_path / "cv"), "--out", str(tmp_path / "m.pt")]) == 1
    assert "export one of them (its fold<k>/best.safetensors)" in capsys.readouterr().err


def test_a_csv_folders_integer_labels_are_matched_through_the_checkpoints_targets(tmp_path, capsys):
    from conftest import NAMES, make_competition_folder
    data = make_competition_folder(tmp_path / "comp", n_train=20, n_test=4, with_meta=False)  # labels 0..9, no names
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", NAMES)  # classes by name, targets 0..9
    assert validate(tmp_path, checkpoint, "--data", data, "--out_dir", tmp_path / "out") == 0
    targets = {r["ID"]: int(r["target"]) for r in csv.DictReader(open(data / "train.csv"))}
    rows = list(csv.DictReader(open(tmp_path / "out" / "val_probs.csv")))
    assert len(rows) == 20 and all(r["label"] == NAMES[targets[r["id"]]] for r in rows)
    assert "on 20 images (all)" in capsys.readouterr().out  # the test set of sample_submission.csv has no labels
