"""Self-contained checkpoints: one .safetensors file = weights + JSON metadata (model name, classes,
image size, mean/std, full config, metrics, epoch), enough to rebuild the model with nothing else.

Usage:
    keeper = CheckpointKeeper(out_dir, keep_top_k=2, maximize=True)
    is_best = keeper.update(model, meta, epoch, score)      # last, top-k and best, written atomically
    model, meta = load_model("runs/<id>/best.safetensors")
    meta = update_meta("runs/<id>/best.safetensors", {"test_time": decision})   # train.py's test-time decision
    state, meta = average_checkpoints([epoch_a, epoch_b])  # avg_checkpoints.py
"""
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from utils.files import atomic_write_bytes, fsync_dir

META_KEY = "sweepcls"


def _atomic_link(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (a hard link, so no extra disk), replaced atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def state_tensors(model: torch.nn.Module) -> dict:
    """The weights as CPU tensors of their own: a snapshot that later training steps do not change."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}


def checkpoint_bytes(model: torch.nn.Module | dict, meta: dict) -> bytes:
    """model: a module, or state_tensors() of one."""
    tensors = state_tensors(model) if isinstance(model, torch.nn.Module) else model
    return save_bytes(tensors, metadata={META_KEY: json.dumps(meta)})


def read_meta(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get(META_KEY)
    if meta is None:
        raise ValueError(f"{path}: not a sweepcls checkpoint (no '{META_KEY}' metadata)")
    return json.loads(meta)


def update_meta(path: str | Path, values: dict) -> dict:
    """The checkpoint with `values` added to its metadata, the weights as they were; the file is replaced atomically
    (a hard link to the old file, last.safetensors or epoch-NNN.safetensors, keeps the old metadata). Returns the
    new metadata."""
    state, meta = load_checkpoint(path)
    meta = {**meta, **values}
    atomic_write_bytes(Path(path), checkpoint_bytes(state, meta))
    return meta


def batchnorm_count(path: str | Path) -> int:
    """BatchNorm layers of a checkpoint's model, counted from its tensor names (each keeps a running_var) in the
    file's header alone: no model is built and no weight is read."""
    with safe_open(str(path), framework="pt") as fh:
        return sum(name.endswith(".running_var") for name in fh.keys())


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, meta) from a checkpoint file."""
    return load_bytes(Path(path).read_bytes()), read_meta(path)


def load_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from the checkpoint alone (architecture from its metadata, no config file)."""
    from models import build_model
    state, meta = load_checkpoint(path)
    model = build_model(meta["model"], num_classes=len(meta["classes"]), img_size=meta["img_size"])
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def average_checkpoints(paths: list[Path]) -> tuple[dict, dict]:
    """(state_dict, meta) of the checkpoints' weights averaged, as timm's avg_checkpoints.py does (BatchNorm running
    statistics averaged too; integer buffers such as num_batches_tracked taken from the first), in float32 sums.
    meta: the first's, with averaged_from (each file, its epoch and metrics). Raises ValueError naming the file that
    is another model, other classes or another size."""
    states, metas = zip(*(load_checkpoint(p) for p in paths))
    for p, state, meta in zip(paths[1:], states[1:], metas[1:]):
        same = {k: meta.get(k) == metas[0].get(k) for k in ("model", "classes", "img_size")}
        if not all(same.values()) or state.keys() != states[0].keys():
            what = [k for k, ok in same.items() if not ok] or ["tensor names"]
            raise ValueError(f"{p}: another {', '.join(what)} than {paths[0]}; average checkpoints of one fit")
    averaged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            total = sum(state[name].to(torch.float32) for state in states)
            averaged[name] = (total / len(states)).to(first.dtype)
        else:
            averaged[name] = first.clone()
    sources = [{"file": str(p), "epoch": m.get("epoch"), "metrics": m.get("metrics", {})} for p, m in zip(paths, metas)]
    return averaged, {**metas[0], "averaged_from": sources}


class CheckpointKeeper:
    """last.safetensors every epoch, epoch-NNN.safetensors for the top k by the monitored score,
    best.safetensors for the best one, which is never deleted.
    With a `writer` (utils.background.BackgroundWriter) the weights are copied at once and the files are written,
    in order, on its thread: call flush() before reading them."""

    def __init__(self, out_dir: Path, keep_top_k: int, maximize: bool, write: bool = True, writer=None):
        """write False: keep the ranking, write no file (torchrun's ranks > 0)."""
        self.dir, self.k, self.sign, self.write = Path(out_dir), keep_top_k, 1 if maximize else -1, write
        self.writer = writer
        self.top: list[tuple[float, int]] = []  # (signed score, epoch), best first
        self.best_score, self.best_epoch = None, None

    @property
    def best_path(self) -> Path:
        return self.dir / "best.safetensors"

    def save_last(self, model: torch.nn.Module, meta: dict) -> Path:
        last = self.dir / "last.safetensors"
        if self.write:
            tensors = state_tensors(model)
            # a new file: best keeps its own
            self._do(lambda: atomic_write_bytes(last, checkpoint_bytes(tensors, meta)))
        return last

    def _do(self, fn) -> None:
        if self.write:
            self.writer.submit(fn) if self.writer is not None else fn()

    def flush(self) -> None:
        """Every file written so far is on disk (raises a write error, e.g. a full disk)."""
        if self.writer is not None:
            self.writer.drain()

    def _link(self, src: Path, dst: Path) -> None:
        self._do(lambda: _atomic_link(src, dst))

    def update(self, model: torch.nn.Module, meta: dict, epoch: int, score: float) -> bool:
        last = self.save_last(model, meta)
        is_best = self.best_score is None or self.sign * score > self.sign * self.best_score
        if is_best:
            self._link(last, self.best_path)
            self.best_score, self.best_epoch = score, epoch
        if self.k > 0:
            self.top.append((self.sign * score, epoch))
            self.top.sort(key=lambda t: (-t[0], t[1]))  # ties: the earlier epoch ranks first
            if (self.sign * score, epoch) in self.top[: self.k]:
                self._link(last, self.dir / f"epoch-{epoch:03d}.safetensors")
            for _, dropped in self.top[self.k:]:
                self._do(lambda p=self.dir / f"epoch-{dropped:03d}.safetensors": p.unlink(missing_ok=True))
            self.top = self.top[: self.k]
        return is_best
