"""export.py's back office: a checkpoint's model, its normalization folded in, as TorchScript, torch.export (.pt2)
or ONNX, checked against PyTorch on a fixed random batch before the file is kept, with a JSON sidecar saying what
input it expects.

Usage:
    info = export_member(for_test(resolve_member(ref, cache_dir)), "torchscript", Path("export/m.pt"), atol=1e-4)
    model = torch.jit.load("export/m.pt"); logits = model(rgb_0_to_1_nchw)   # info: classes, img_size, parity
"""
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from models.checkpoint import load_model
from utils import UserError
from utils.files import atomic_write_bytes
from workflows.ensemble import Member

FORMATS = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}  # format -> the file's suffix
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter (torch.onnx, dynamo) and the parity check
PARITY_SEED = 0   # the fixed random batch both models are run on
TRACE_BATCH, CHECK_BATCH = 2, 3  # images: traced with one batch size, checked with another (the batch is dynamic)


class Normalized(torch.nn.Module):
    """The checkpoint's model taking what a deployment has: float32 RGB in [0, 1], NCHW, img_size x img_size; the
    (x - mean) / std of validation (datasets/transforms.py eval_transform) is inside. Returns logits."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def _torchscript(model, example: torch.Tensor, path: Path):
    with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it is still what libtorch loads
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(model, example), str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(x)


def _pt2(model, example: torch.Tensor, path: Path):
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x)


def _onnx(model, example: torch.Tensor, path: Path):
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}, not installed here: pip install "
                        f"{' '.join(ONNX_PACKAGES)} (or export --format torchscript / pt2)")
    import onnxruntime
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


EXPORTERS = {"torchscript": _torchscript, "pt2": _pt2, "onnx": _onnx}  # each writes the file and returns a loader


def _exported(fmt: str, model, example: torch.Tensor, path: Path):
    """The exporter's loader; an exporter's own failure (an operation it cannot express) as one error line."""
    try:
        return EXPORTERS[fmt](model, example, path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - tracers and exporters raise many kinds; the first line says which op
        first = (str(e).strip().splitlines() or [""])[0][:300]
        others = " or ".join(f for f in FORMATS if f != fmt)
        raise UserError(f"{fmt} export failed: {type(e).__name__}: {first}; try --format {others}") from None


def default_out(member_stem: str, fmt: str) -> Path:
    return Path("export") / f"{member_stem}{FORMATS[fmt]}"


@torch.no_grad()
def parity(model, exported, img_size: int) -> dict:
    """Max abs difference of logits and of probabilities, PyTorch against the exported file, on a fixed random batch
    of CHECK_BATCH images (not the traced batch size: the batch size stays free)."""
    x = torch.rand(CHECK_BATCH, 3, img_size, img_size, generator=torch.Generator().manual_seed(PARITY_SEED + 1))
    ref, got = model(x).float(), exported(x).float()
    if ref.shape != got.shape:
        raise UserError(f"parity: the exported model returns shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    return {"batch": CHECK_BATCH, "seed": PARITY_SEED + 1, "max_abs_logits": float((ref - got).abs().max()),
            "max_abs_probs": float((ref.softmax(1) - got.softmax(1)).abs().max())}


def sidecar(member: Member, fmt: str, out: Path, check: dict) -> dict:
    """What a deployment needs to feed the file and read its output, without sweepcls."""
    meta, size = member.meta, member.meta["img_size"]
    return {"format": fmt, "file": out.name, "checkpoint": str(member.paths[0]), "member": member.name,
            "model": meta["model"], "classes": meta["classes"], "targets": meta.get("targets"), "img_size": size,
            "mean": meta["mean"], "std": meta["std"],
            "input": {"layout": "NCHW", "shape": ["batch", 3, size, size], "dtype": "float32", "channels": "RGB",
                      "range": [0.0, 1.0], "resize": f"to {size}x{size}, bilinear, aspect ratio not kept (as "
                      f"sweepcls validates)", "normalization": "inside the model: (x - mean) / std"},
            "output": "logits, one per class in `classes` order (softmax for probabilities); no TTA or test_bn",
            "parity": check, "torch": torch.__version__}


def export_member(member: Member, fmt: str, out: Path, atol: float = 1e-4) -> dict:
    """Write `out` (and out + .json, the sidecar) from the member's one checkpoint, only when the exported model
    gives PyTorch's logits within atol on the parity batch; else a UserError and no file. Returns the sidecar."""
    if len(member.paths) > 1:
        raise UserError(f"{member.name} is a cross-validated run of {len(member.paths)} fold checkpoints; export "
                        f"one of them (its fold<k>/best.safetensors)")
    net, meta = load_model(member.paths[0], "cpu")
    model = Normalized(net, meta["mean"], meta["std"]).eval()
    size = meta["img_size"]
    example = torch.rand(TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(PARITY_SEED))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")  # torch.export.save wants its suffix
    try:
        check = parity(model, _exported(fmt, model, example, tmp), size)
        check["atol"] = atol
        if not check["max_abs_logits"] <= atol:  # NaN fails too
            raise UserError(f"parity: the exported {fmt} model's logits differ from PyTorch's by up to "
                            f"{check['max_abs_logits']:.3g} (probabilities {check['max_abs_probs']:.3g}) on a fixed "
                            f"random batch, above --atol {atol:g}; nothing was written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    info = sidecar(member, fmt, out, check)
    atomic_write_bytes(sidecar_path(out), (json.dumps(info, indent=1) + "\n").encode())
    return info


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")
