"""Export a trained model to TorchScript (default), torch.export (.pt2) or ONNX, checked against PyTorch.

Usage:
    python export.py runs/<model>-<id>                                  # export/<run id>.pt (its final fit, if any)
    python export.py runs/<model>-<id>/best.safetensors --format pt2 --out model.pt2
    python export.py ENTITY/PROJECT/model-<run id>:best --format onnx   # needs: pip install onnx onnxscript onnxruntime
The exported model takes float32 RGB images in [0, 1], NCHW, resized to the checkpoint's img_size (both sides,
bilinear) and normalizes them itself with the checkpoint's mean and std; it returns logits, one per class (no TTA,
no test_bn). The file is kept only when it gives PyTorch's logits within --atol on a fixed random batch; the max
abs differences are printed and written, with the classes, img_size, mean, std and input layout, into <out>.json.
"""
import argparse
import sys
from pathlib import Path

from datasets.cache import default_cache_dir
from utils import UserError, report_error
from workflows.ensemble import file_stem, for_test, resolve_member
from workflows.export import FORMATS, default_out, export_member, sidecar_path
from workflows.flags import HelpFormatter, add_config_flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("member", help="checkpoint file, run dir (its final fit where it has one, as predict.py) or "
                                       "W&B artifact ref")
    parser.add_argument("--format", default="torchscript", choices=sorted(FORMATS),
                        help="torchscript: torch.jit.trace, loads with torch.jit.load or C++ libtorch; pt2: "
                             "torch.export, loads with torch.export.load(path).module(); onnx: onnxruntime and others")
    parser.add_argument("--out", default="", help="file to write; '' = export/<member>.pt, .pt2 or .onnx")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest max abs difference of logits, PyTorch against the exported file, that passes")
    add_config_flags(parser, "cache_dir")  # where a W&B artifact is downloaded
    args = parser.parse_args(argv)
    try:
        member = for_test(resolve_member(args.member, Path(args.cache_dir or default_cache_dir())))
        out = Path(args.out) if args.out else default_out(file_stem(member), args.format)
        info = export_member(member, args.format, out, args.atol)
    except UserError as e:
        return report_error(e)
    check = info["parity"]
    print(f"{member.name} ({info['model']}, {info['img_size']} px, {len(info['classes'])} classes) as {args.format} | "
          f"parity on {check['batch']} random images: max abs diff logits {check['max_abs_logits']:.3g}, "
          f"probs {check['max_abs_probs']:.3g} (--atol {args.atol:g})")
    print(f"input: float32 RGB in [0, 1], NCHW, {info['img_size']}x{info['img_size']}; mean/std inside the model; "
          f"output: logits")
    print(f"results in {out.parent}/: {out.name}, {sidecar_path(out).name} (classes, img_size, mean, std, input)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
