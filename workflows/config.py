"""One flat, typed config: defaults < --config FILE.yaml < --key=value < values a W&B sweep locks.

Usage: cfg = Config.from_dict(run.config)      # after wandb.init; the flags: workflows/flags.py parse_config
Every field is a CLI flag of the same snake_case name, the name `wandb agent` passes and
`sweep.yaml` uses. Unknown keys are errors everywhere, so a typo in a sweep cannot pass silently.
"""
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from utils import UserError


def opt(default, help, choices: Callable[[], list] | tuple | None = None, auto_bool: bool = False):
    """A config field with its --help text and, optionally, its valid values (or a function giving them).
    auto_bool: a text field holding "auto", "true" or "false" (any boolean spelling is accepted)."""
    return field(default=default, metadata={"help": help, "auto_bool": auto_bool,
                                            "choices": ("auto", "false", "true") if auto_bool else choices})


# Valid values of a key, read from a registry when asked: importing this module stays free of torch.
def _augs():
    from datasets.transforms import AUGS
    return AUGS


def _tta():
    from datasets.transforms import TTA, tta_for_shift
    return {**TTA, "auto": tta_for_shift}  # auto: decided per run, from the test set's measured turns and mirrors


def _samplers():
    from datasets import SAMPLERS
    return SAMPLERS


def _optimizers():
    from optim import OPTIMIZERS
    return OPTIMIZERS


def _schedulers():
    from optim import SCHEDULERS
    return SCHEDULERS


def _losses():
    from losses import LOSSES
    return LOSSES


def _class_weights():
    from losses import CLASS_WEIGHTS
    return CLASS_WEIGHTS


@dataclass
class Config:
    # --- data ---
    data: str = opt("digits", "'digits' (bundled demo, no download) or a folder: an ImageFolder tree, "
                              "or train.csv + train/ (+ meta.csv, sample_submission.csv, test/)")
    image_col: str = opt("ID", "train.csv column holding the image file name")
    label_col: str = opt("target", "train.csv column holding the label (an int or a class name)")
    group_col: str = opt("", "train.csv column whose groups (a person, a source) never straddle train and val; "
                             "'' = none")
    val_fraction: float = opt(0.2, "fraction of the labelled images held out for validation (when folds = 0)")
    folds: int = opt(0, "K >= 2: K-fold cross-validation, validate on fold `fold`; 0 = one stratified holdout")
    fold: int = opt(0, "which fold validates, 0 <= fold < folds")
    cv: bool = opt(False, "train all `folds` folds in one run: the monitored metric becomes their mean (std beside "
                          "it), with out-of-fold probabilities for every training image in oof.csv")
    final_fit: str = opt("auto", "after the holdout fit (which picks the best epoch and decides --tta and --test_bn "
                                 "auto), train again on every labelled image, validation included, for the same "
                                 "epochs, in out_dir/final/; its last epoch predicts the test set and writes the "
                                 "submission. The monitor stays the holdout's. auto = true when the data has a test "
                                 "set and cv is off (with cv, the folds' models predict the test set together)",
                          auto_bool=True)
    img_size: int = opt(0, "square input size in px; 0 = auto: the images' median side rounded to 32 px, at least 64 "
                           "and at most the model's pretrained size (the digits demo: 48)")
    aug_preset: str = opt("auto", "training augmentation preset", _augs)
    aug_floor: float = opt(0.0, "0-1, --aug_preset auto and --val_noise auto on a shifted test set: every "
                                "photometric corruption the measure left off (tint, brightness, contrast, blur, "
                                "noise, JPEG) is still drawn for this share of the images, at a middle magnitude: "
                                "cover what a measure can miss; 0 = only what was measured")
    aug_strength: float = opt(1.0, "0-1, scales every probability and magnitude of the preset: 0 = resize + normalize "
                                   "only, 1 = full force (auto: 1 = as measured on the test set)")
    augmix: float = opt(0.0, "0-1: the share of training images given AugMix (timm's augmix-m3-w3: chains of "
                             "PIL operations blended with the image) before the preset's operations; 0 = off")
    val_noise: str = opt("auto", "auto = validate on images given the corruption measured on the test set (fixed per "
                                 "image), so the monitor, early stopping and sweeps track the leaderboard; the clean "
                                 "scores are logged as val_clean/*; none = clean validation", ("auto", "none"))
    mixup: float = opt(0.0, "mixup alpha (timm Mixup); 0 = off; needs a loss that takes soft targets")
    cutmix: float = opt(0.0, "cutmix alpha (timm Mixup); 0 = off; with mixup too, each batch picks one")
    mix_prob: float = opt(1.0, "probability that a batch is mixed when mixup or cutmix is on")
    sampler: str = opt("random", "training sampler: random = each image once per epoch; imbalanced = "
                                 "torchsampler's class-balanced draw with replacement", _samplers)
    tta: str = opt("auto", "test-time augmentation, averaging probabilities over the views; a name is used at every "
                           "validation and at the test set, auto validates without TTA and decides at the end:", _tta)
    test_bn: str = opt("auto", "before predicting the test set, adapt = re-estimate BatchNorm statistics on the test "
                               "images (test-time adaptation to their noise, Schneider et al. 2020); none = as "
                               "trained; auto = adapt when the model has BatchNorm layers, the test set was measured "
                               "shifted from the training set (test_shift) and statistics from the test images raise "
                               "the noisy validation macro-F1, else none. train.py records what "
                               "tta and test_bn became in best.safetensors; predict.py and ensemble.py use that under "
                               "auto", ("adapt", "auto", "none"))
    pseudo_labels: str = opt("", "CSV of test-set probabilities (predict.py or ensemble.py --save_probs): the test "
                                 "images whose top probability is >= pseudo_threshold train with that label (never "
                                 "validate)")
    pseudo_threshold: float = opt(0.9, "a test image whose top probability is at least this is a pseudo-label")
    pseudo_share: float = opt(0.3, "0-1: also, per predicted class, its most confident share of the test images "
                                   "(class-balanced: every class gets pseudo-labels on a shifted test set, where one "
                                   "threshold keeps few; +0.08 test macro-F1 over the threshold alone on both "
                                   "benchmarks, docs/noisy-test.md); 0 = the threshold alone")
    final_pseudo: float = opt(0.3, "0-1: the final fit (--final_fit) also trains on the holdout model's test "
                                   "predictions, per predicted class its most confident share of the test images "
                                   "(and any at p >= pseudo_threshold): a self-training round inside the run, +0.03 "
                                   "test macro-F1 on both benchmarks (docs/noisy-test.md); 0 = off; --pseudo_labels, "
                                   "when given, is used instead")
    label_fixes: str = opt("", "CSV of id,new_label (a --cv run's suspect_labels.csv, edited): relabel each listed "
                               "training image to its new_label, or drop it where new_label is 'exclude'; blank rows "
                               "are kept as they are")
    skip_bad_images: bool = opt(False, "train without training images that cannot be read (listed in the log and "
                                       "the W&B summary) instead of stopping")
    workers: int = opt(-1, "DataLoader worker processes; -1 = one per CPU core (under torchrun: per process's share), "
                           "up to 8")
    cache: str = opt("auto", "decode and resize every image once, then augment from the uint8 copy: ram = in this "
                             "process; disk = a .npy in cache_dir that later runs and sweep trials with the same data "
                             "and img_size reuse; none = decode each image at every epoch; auto = ram for the digits "
                             "demo, else disk",
                     ("auto", "ram", "disk", "none"))
    cache_dir: str = opt("", "folder of the caches: --cache disk files, downloaded dataset and model artifacts, and "
                             "(predict.py, ensemble.py, eda.py --diff) predictions in preds/; '' = $SWEEPCLS_CACHE_DIR "
                             "or ~/.cache/sweepcls")
    cache_max_gb: float = opt(0.0, "GB (fractions allowed) that the --cache disk files in cache_dir may hold together: "
                                   "a new one first deletes the least recently used ones no running process holds "
                                   "(python cache.py lists and clears them); one data set over it alone is an error; "
                                   "0 = auto: the smaller of 50 GB and half of (the free disk + what they hold)")
    # --- model ---
    model: str = opt("auto", "any timm model name (timm.list_models()); auto = resnet18 (the digits demo: resnet10t)")
    pretrained: str = opt("auto", "start from the model's pretrained weights: true = from the hub (needs "
                                  "internet); auto = from $SWEEPCLS_WEIGHTS_DIR or the Hugging Face cache, else a "
                                  "download bounded in time, else random initialization, said in one line (the "
                                  "digits demo: false)",
                          auto_bool=True)
    pretrained_path: str = opt("", "local weight file (.safetensors/.pth) to start from; no download")
    drop_rate: float = opt(0.0, "dropout before the classifier (timm drop_rate)")
    drop_path_rate: float = opt(0.0, "stochastic depth (timm drop_path_rate); 0 = the model's default")
    # --- optimization ---
    epochs: int = opt(12, "training epochs")
    batch_size: int = opt(32, "images per forward pass; an optimizer step sees batch_size x accum_steps")
    lr: float = opt(2e-3, "peak learning rate")
    weight_decay: float = opt(0.05, "decoupled weight decay (not applied to biases and norm weights)")
    optimizer: str = opt("adamw", "optimizer name", _optimizers)
    momentum: float = opt(0.9, "momentum of sgd/sgdp (Nesterov)")
    sam: bool = opt(False, "wrap the optimizer in SAM (sharpness-aware minimization): two passes per step")
    sam_rho: float = opt(0.05, "SAM neighbourhood radius; ASAM typically wants ~10x more (0.5-2)")
    sam_adaptive: bool = opt(False, "ASAM: the radius scales with each weight's magnitude")
    accum_steps: int = opt(1, "micro-batches whose gradients add up to one optimizer step")
    clip_grad: float = opt(0.0, "clip the global gradient norm to this; 0 = off")
    ema: bool = opt(False, "keep an exponential moving average of the weights (timm ModelEmaV3); "
                           "the EMA weights are evaluated and checkpointed")
    ema_decay: float = opt(0.999, "EMA decay (with timm's warm-up, so short runs still move)")
    scheduler: str = opt("cosine", "learning-rate schedule, stepped per iteration (plateau: per epoch)",
                         _schedulers)
    warmup_epochs: float = opt(1.0, "linear lr warm-up, at most 20% of --epochs (cosine, step, none; onecycle: its "
                                    "rising share)")
    warmup_lr: float = opt(0.0, "the lr the warm-up starts from (cosine, step, none)")
    min_lr: float = opt(0.0, "cosine: the lr at the last step")
    layer_decay: float = opt(0.0, "in (0, 1): each layer's lr times layer_decay^(its depth from the head), timm's "
                                  "layer-wise decay for fine-tuning pretrained ViTs/ConvNeXts; 0 = off")
    step_size: int = opt(5, "step: epochs between lr drops")
    gamma: float = opt(0.1, "step and plateau: lr multiplier at each drop")
    plateau_patience: int = opt(2, "plateau: epochs without improvement before a drop")
    patience: int = opt(0, "early stopping: stop after this many epochs without a new best; 0 = off")
    nan_patience: int = opt(5, "a step whose loss is NaN/inf is skipped; this many in a row stop the run (exit 1, "
                               "checkpoints as they were, the reason in the W&B summary)")
    resume: str = opt("auto", "continue an interrupted run where it stopped (inside the epoch after a stop signal, "
                              "after its last completed epoch after a kill): auto = from "
                              "out_dir/resume.pt when there is one (a rerun with the same --out_dir, a relaunched "
                              "sweep trial); a run dir or resume.pt path; '' = never continue. A folder that holds "
                              "a run's checkpoints and nothing to continue from is refused: see --restart")
    restart: bool = opt(False, "start over in out_dir: the run already there (finished or interrupted) is moved to "
                               "<out_dir>.before-<YYYYmmdd-HHMMSS> first, never deleted")
    # --- loss ---
    loss: str = opt("ce", "loss name", _losses)
    class_weights: str = opt("inverse", "weighted_ce weights and focal alpha, from training class counts: "
                                        "1/n, 1/sqrt(n) or effective number (Cui et al. 2019)",
                             _class_weights)
    cb_beta: float = opt(0.999, "beta of the effective number of samples (class_weights=effective)")
    label_smoothing: float = opt(0.1, "smoothing of label_smoothing, and of asl")
    focal_gamma: float = opt(2.0, "focal: focusing exponent; 0 = cross entropy")
    focal_alpha: bool = opt(False, "focal: weight classes by --class_weights")
    asl_gamma_pos: float = opt(1.0, "asl: focusing exponent on the true class")
    asl_gamma_neg: float = opt(4.0, "asl: focusing exponent on the other classes")
    amp: bool = opt(True, "mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU")
    compile: bool = opt(False, "torch.compile the training forward/backward (minutes of compiling first; the same "
                               "weights are evaluated and saved uncompiled)")
    sync_bn: bool = opt(False, "under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm) "
                               "instead of each GPU's share")
    device: str = opt("auto", "auto = cuda when available, else cpu; cuda:N = that GPU")
    seed: int = opt(42, "seed for splits, init, augmentation and sampling")
    # --- model selection, checkpoints, outputs ---
    monitor: str = opt("val/f1_macro", "metric that picks the best epoch; its best value goes in the W&B summary")
    monitor_mode: str = opt("auto", "max or min; auto = min for a *loss key, else max", ("auto", "max", "min"))
    keep_top_k: int = opt(2, "per-epoch checkpoints kept, ranked by the monitor (best.safetensors and "
                             "last.safetensors are kept apart)")
    table_rows: int = opt(200, "max rows in each W&B prediction table")
    log_every: int = opt(20, "a W&B row every N optimizer steps: train/loss_step (that step's loss) and train/lr_step "
                             "against global_step (the epoch rows keep their own step, epoch); 0 = epoch rows only")
    log_model: str = opt("best", "checkpoints as versions of the W&B artifact model-<run id> (aliases best, latest, "
                                 "epoch-N): best = each new best, at most one upload per 2 minutes online, the newest "
                                 "always before the run finishes, however it ends (offline: once, at the end); all = "
                                 "every epoch's weights; end = the best once, at the end; off = none",
                         ("off", "end", "best", "all"))
    out_dir: str = opt("", "run output folder; '' = runs/<run_name or model>-<run id> ($SWEEPCLS_RUNS_DIR "
                                  "for runs/; a sweep's trial: <sweep dir>/runs/<run id>)")
    # --- W&B ---
    wandb_mode: str = opt("auto", "auto = online when an API key is configured, else offline; WANDB_MODE wins over "
                                  "auto", ("auto", "online", "offline", "disabled"))
    project: str = opt("", "W&B project; '' = $WANDB_PROJECT or 'sweepcls'")
    entity: str = opt("", "W&B entity (team or user); '' = your default")
    run_name: str = opt("", "W&B run name; '' = W&B's (online) or <model>-<run id> (offline)")
    wandb_console: bool = opt(True, "send the console output to W&B (files/output.log), online and offline: a "
                                    "failed trial says why in W&B; False: no capture")
    # --- lineage: what this run is for (none of these change what it computes) ---
    notes: str = opt("", "the run's hypothesis or remark: W&B run notes, run.json and the journal (python journal.py)")
    tags: str = opt("", "comma-separated W&B run tags (a sweep's own tags are kept)")
    parent: str = opt("", "the run this one varies: a run dir, a run id under the runs folder, or "
                          "ENTITY/PROJECT/RUN_ID; its changed keys are logged as changed_vs_parent and the journal "
                          "scores against it")

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Build from any mapping (W&B config, YAML), coercing text and numbers to each field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"unknown config key(s) {unknown}; valid keys: {sorted(fields)}")
        cfg = cls(**{k: coerce(fields[k], v) for k, v in values.items()})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Reject impossible values early, naming the key and what to do."""
        for f in dataclasses.fields(self):
            valid = choices_of(f)
            if valid is not None and getattr(self, f.name) not in valid:
                raise UserError(f"--{f.name}={getattr(self, f.name)!r} is not one of {list(valid)}")
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device), "device must be auto, cpu, cuda or cuda:N"),
            (self.batch_size > 0, "batch_size must be > 0"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.img_size == 0 or self.img_size >= 8, "img_size must be >= 8 px (or 0 = auto)"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.folds == 0 or self.folds >= 2, "folds must be 0 (holdout) or >= 2"),
            (self.folds == 0 or 0 <= self.fold < self.folds, f"fold must satisfy 0 <= fold < folds ({self.folds})"),
            (not self.cv or self.folds >= 2, "cv needs folds >= 2, e.g. --folds 5 --cv True"),
            (not (self.cv and self.final_fit == "true"),
             "final_fit follows one holdout fit; with cv, the folds' models predict the test set together: pass one"),
            (self.keep_top_k >= 0 and self.table_rows >= 0, "keep_top_k and table_rows must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.aug_strength <= 1, "aug_strength must be in [0, 1]"),
            (0 <= self.aug_floor <= 1, "aug_floor must be in [0, 1]"),
            (0 <= self.augmix <= 1, "augmix must be in [0, 1]"),
            (self.cache_max_gb >= 0, "cache_max_gb must be >= 0 (0 = auto)"),
            (0 < self.pseudo_threshold <= 1, "pseudo_threshold must be in (0, 1]"),
            (0 <= self.pseudo_share <= 1, "pseudo_share must be in [0, 1]"),
            (0 <= self.final_pseudo <= 1, "final_pseudo must be in [0, 1]"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix alphas must be >= 0"),
            (0 <= self.mix_prob <= 1, "mix_prob must be in [0, 1]"),
            (not (self.mixup or self.cutmix) or self.batch_size % 2 == 0, "mixup/cutmix need an even batch_size"),
            (0 <= self.drop_rate < 1 and 0 <= self.drop_path_rate < 1,
             "drop_rate and drop_path_rate must be in [0, 1)"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.sam_rho > 0, "sam_rho must be > 0"),
            (self.accum_steps >= 1, "accum_steps must be >= 1"),
            (self.clip_grad >= 0, "clip_grad must be >= 0 (0 = off)"),
            (0 < self.ema_decay < 1, "ema_decay must be in (0, 1)"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.warmup_lr >= 0 and self.min_lr >= 0, "warmup_lr and min_lr must be >= 0"),
            (0 <= self.layer_decay < 1, "layer_decay must be in [0, 1) (0 = off)"),
            (self.step_size >= 1 and self.plateau_patience >= 0, "step_size must be >= 1, plateau_patience >= 0"),
            (0 < self.gamma <= 1, "gamma must be in (0, 1]"),
            (self.patience >= 0, "patience must be >= 0 (0 = off)"),
            (self.nan_patience >= 1, "nan_patience must be >= 1"),
            (not self.restart or self.resume in ("auto", ""),
             f"--restart starts over in out_dir and --resume {self.resume} continues a run: pass one of them"),
            (0 <= self.cb_beta < 1, "cb_beta must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.focal_gamma >= 0 and self.asl_gamma_pos >= 0 and self.asl_gamma_neg >= 0,
             "focal_gamma, asl_gamma_pos and asl_gamma_neg must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"invalid config: {msg}")

    @property
    def maximize(self) -> bool:
        return maximizes(self.monitor, self.monitor_mode)


def maximizes(metric: str, mode: str = "auto") -> bool:
    """Whether a larger value of `metric` is better: mode max or min says so; auto = min for a *loss key."""
    return not metric.endswith("loss") if mode == "auto" else mode == "max"


# keys that never change what a run computes: where it writes and logs, how fast, and what it is for.
# They may differ on resume, and they are not "what changed" in a run's record.
BOOKKEEPING_KEYS = {"resume", "out_dir", "workers", "wandb_mode", "project", "entity", "run_name", "table_rows",
                    "log_every",
                    "log_model", "device", "cache", "cache_dir", "cache_max_gb", "compile", "wandb_console", "notes",
                    "tags", "parent", "restart"}
# keys train.py decides from the data when they are auto (model, img_size 0, pretrained): a resumed run decides again
AUTO_KEYS = {"model", "img_size", "pretrained", "pretrained_path"}
# where the data is read from: the data fingerprint tells what it was, so these are no "change" either
DATA_KEYS = {"data", "image_col", "label_col"}
# config entries a run adds to its W&B config beside the Config keys (workflows/lineage.py); read back, they are
# dropped
ADDED_CONFIG_KEYS = {"changed", "changed_keys", "changed_vs_parent", "parent_run", "data_fingerprint", "code",
                     "test_shift", "auto", "pseudo_label_source"}


def choices_of(f: dataclasses.Field) -> list | None:
    valid = f.metadata.get("choices")
    valid = valid() if callable(valid) else valid
    return None if valid is None else sorted(valid) if isinstance(valid, dict) else list(valid)


def describe_choices(f: dataclasses.Field) -> str:
    """'; one of a, b' or, for a registry, each name with the first paragraph of its docstring."""
    valid = f.metadata.get("choices")
    table = valid() if callable(valid) else None
    if isinstance(table, dict):
        first_paragraph = lambda fn: " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        return "".join(f"\n  {n}: {first_paragraph(table[n])}" for n in sorted(table))
    return f"; one of {', '.join(choices_of(f))}" if valid else ""


def parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    key = str(text).strip().lower()
    if key in ("true", "1", "yes"):
        return True
    if key in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use True/False/true/false/1/0)")


def coerce(f: dataclasses.Field, value):
    """Convert a value from the CLI, a YAML file or W&B to the field's type, or fail naming the key."""
    try:
        if f.type in (bool, "bool"):
            return parse_bool(value)
        if f.metadata.get("auto_bool"):
            return "auto" if str(value).strip().lower() == "auto" else str(parse_bool(value)).lower()
        if f.type in (int, "int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if f.type in (float, "float"):
            return float(value)
        return "" if value is None else str(value)
    except (TypeError, ValueError) as e:
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        raise UserError(f"config key {f.name!r}: cannot use {value!r} as {kind}: {e}") from None
