"""A sweep.yaml as train.py and `wandb agent` see it: checked against train.py's Config before anything
runs, and each trial's command line built the way `wandb agent` builds it (wandb/wandb_agent.py,
wandb/sdk/launch/sweeps/utils.py), so one file serves `wandb agent` online and sweep.py offline.

Usage:
    sweep = load_sweep("sweep.yaml")                      # SweepError lists every problem at once
    argv = agent_command(sweep, {"lr": 0.01, "model": "resnet18"}, args_json_file="trial.json")
    rows = leaderboard(sweep, SweepDir("sweeps/sweep"))     # an offline sweep dir's trials, best first
"""
import csv
import dataclasses
import fcntl
import itertools
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from utils import UserError
from utils.files import atomic_write_bytes
from utils.runs import random_id, read_local
from workflows.config import Config

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb agent's default
ENV_MACRO = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
MACROS = ("env", "interpreter", "program", "args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags",
          "args_json", "args_json_file", "args_append_hydra", "args_override_hydra")
# distributions whose min/max are values train.py receives (log_uniform's are natural-log exponents)
VALUE_BOUNDS = ("uniform", "q_uniform", "int_uniform", "log_uniform_values", "q_log_uniform_values",
                "inv_log_uniform_values")


class SweepError(UserError):
    """A sweep.yaml that would fail: every problem found, one per line."""


def sweeps_engine():
    """W&B's open-source search engine (`sweeps` on PyPI); it warns about pydantic at import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def load_sweep(path: str | Path, overrides: dict | None = None) -> dict:
    """The sweep file, checked; overrides (sweep.py --set key=value) fix those keys for every trial (a quick try:
    --set epochs=1), replacing what the file says about them."""
    try:
        sweep = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SweepError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{path}: expected a mapping with method, metric and parameters")
    if overrides:
        sweep["parameters"] = {**(sweep.get("parameters") or {}), **{k: {"value": v} for k, v in overrides.items()}}
    problems = check_sweep(sweep)
    if problems:
        raise SweepError(f"{path} would fail:\n" + "\n".join(f"  - {p}" for p in problems))
    return sweep


def _candidates(name: str, spec: dict) -> list:
    """The values of a parameter that can be checked without sampling: value, values, and bounds in value space."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if spec.get("distribution", "uniform" if "min" in spec else None) in VALUE_BOUNDS:
        return [spec[k] for k in ("min", "max") if k in spec]
    return []


def check_sweep(sweep: dict) -> list[str]:
    """Every reason this sweep would fail: W&B's schema, unknown keys, invalid values, a metric train.py
    does not report, a missing program. An empty list means it can run."""
    sweeps = sweeps_engine()
    problems = [f"schema: {v}" for v in sweeps.schema_violations_from_proposed_config(sweep)]
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        return problems + ["parameters: a mapping of train.py keys is required"]
    fields = {f.name for f in dataclasses.fields(Config)}
    fixed = {k: s["value"] for k, s in params.items() if isinstance(s, dict) and "value" in s and k in fields}
    for name, spec in params.items():
        if name not in fields:
            problems.append(f"parameters.{name}: not a train.py key (python train.py --help lists them)")
        elif not isinstance(spec, dict):
            problems.append(f"parameters.{name}: expected a mapping such as {{value: ...}} or {{values: [...]}}")
        elif "parameters" in spec:
            problems.append(f"parameters.{name}: nested parameters are not supported; train.py's keys are flat")
        else:
            for value in _candidates(name, spec):
                try:
                    Config.from_dict({**fixed, name: value})
                except UserError as e:
                    problems.append(f"parameters.{name}: {value!r}: {e}")
    problems += _check_models(params)
    problems += _check_metric(sweep, params, fixed)
    problems += _check_command(sweep)
    if not problems:  # the engine's own first proposal: catches what the schema lets through
        try:
            sweeps.next_run(sweep, [])
        except Exception as e:  # noqa: BLE001 - the engine raises plain ValueError/KeyError/TypeError
            problems.append(f"the sweeps engine cannot propose a run: {type(e).__name__}: {e}")
    return problems


def _check_models(params: dict) -> list[str]:
    """Every model name exists in timm, and each model takes each image size (one blank forward pass on
    the CPU, about a second for five light models): a fixed-grid model at the wrong size fails here."""
    from models import DEFAULT_MODEL, MIN_AUTO_SIZE, build_model, check_input_size, check_model_name
    names = _candidates("model", params["model"]) if isinstance(params.get("model"), dict) else [Config.model]
    sizes = (_candidates("img_size", params["img_size"]) if isinstance(params.get("img_size"), dict)
             else [Config.img_size])
    names = [DEFAULT_MODEL if n == "auto" else n for n in names]  # auto: what train.py picks for a data folder
    sizes = [MIN_AUTO_SIZE if not int(s) else s for s in sizes]  # 0 = auto: the smallest size it picks
    problems, known = [], []
    for name in names:
        try:
            check_model_name(str(name))
            known.append(str(name))
        except UserError as e:
            problems.append(f"parameters.model: {e}")
    for name, size in list(itertools.product(known, sizes))[:32]:
        try:
            check_input_size(build_model(name, num_classes=2, img_size=int(size)), name, int(size))
        except (UserError, TypeError, ValueError) as e:
            problems.append(f"parameters.model/img_size: {e}")
    return problems


def _check_metric(sweep: dict, params: dict, fixed: dict) -> list[str]:
    metric = sweep.get("metric")
    if metric is None:
        needs = sweep.get("method") == "bayes" or "early_terminate" in sweep
        return ["metric: bayes and early_terminate need metric: {name: val/f1_macro, goal: maximize}"] if needs else []
    if "monitor" in params and "value" not in params["monitor"]:
        return ["parameters.monitor: the sweep optimizes one metric; give monitor a single value"]
    try:
        cfg = Config.from_dict(fixed)
    except UserError:
        return []  # already reported per parameter
    name, goal = metric.get("name"), metric.get("goal", "minimize")
    if name != cfg.monitor:
        return [f"metric.name {name!r} is not train.py's monitored key {cfg.monitor!r}, the only metric it reports "
                f"as its best value; set metric.name: {cfg.monitor} or parameters.monitor.value: {name}"]
    if (goal == "maximize") != cfg.maximize:
        return [f"metric.goal {goal!r}, but train.py {'maximizes' if cfg.maximize else 'minimizes'} {name}; "
                f"set goal: {'maximize' if cfg.maximize else 'minimize'} or monitor_mode"]
    return []


def _check_command(sweep: dict) -> list[str]:
    problems = []
    program = sweep.get("program")
    if not program:
        problems.append("program: required (program: train.py)")
    elif not Path(program).is_file():
        problems.append(f"program: {program} not found from {Path.cwd()}; run from the repository root")
    command = sweep.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list):
        return problems + ["command: expected a list such as [${env}, ${interpreter}, ${program}, ${args}]"]
    for part in map(str, command):
        macro = part.startswith("${") and part.endswith("}") and not part.startswith("${envvar:")
        if macro and part[2:-1] not in MACROS:
            problems.append(f"command: unknown macro {part}; wandb agent knows "
                            + ", ".join("${" + m + "}" for m in MACROS))
    return problems


def plain(value):
    """A proposed value as Python's own type (the engine returns numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def agent_command(sweep: dict, params: dict, args_json_file: str = "") -> list[str]:
    """The argv `wandb agent` runs for these values: the sweep's `command:` (or the default) with
    ${envvar:NAME} and the ${...} macros expanded, values formatted with str() as the agent does."""
    flags, no_equals, no_hyphens, no_bool = [], [], [], []
    for key, value in params.items():
        flags.append(f"--{key}={value}")
        no_hyphens.append(f"{key}={value}")
        no_equals += [f"--{key}", str(value)]
        if not isinstance(value, bool):
            no_bool.append(f"--{key}={value}")
        elif value:
            no_bool.append(f"--{key}")
    macros = {
        "env": ["/usr/bin/env"], "interpreter": ["python"], "program": [sweep["program"]],
        "args": flags, "args_no_equals": no_equals, "args_no_hyphens": no_hyphens, "args_no_boolean_flags": no_bool,
        "args_json": [json.dumps(params)], "args_json_file": [args_json_file],
        "args_append_hydra": ["+" + f for f in no_hyphens], "args_override_hydra": ["++" + f for f in no_hyphens],
    }
    argv = []
    for part in sweep.get("command") or DEFAULT_COMMAND:
        part = ENV_MACRO.sub(lambda m: os.environ.get(m.group(1), m.group(1)), str(part))
        if part.startswith("${") and part.endswith("}"):
            argv += macros.get(part[2:-1]) or []
        else:
            argv.append(part)
    return argv


def param_file_text(params: dict) -> str:
    """The WANDB_SWEEP_PARAM_PATH file the agent writes: the values wandb.init locks in the run's config."""
    return "wandb_version: 1\n\n" + yaml.safe_dump({k: {"value": v} for k, v in params.items()}, sort_keys=False)


# ----------------------------------------------------------------------------- the sweep dir
# trial states: the runner's own, and what the engine is told
ENGINE_STATE = {"running": "running", "stopping": "running", "finished": "finished", "stopped": "killed",
                "failed": "failed", "interrupted": "preempted"}
LIVE, DONE = ("running", "stopping"), ("finished", "stopped", "failed")  # interrupted trials are relaunched


@dataclass
class Trial:
    id: str
    number: int
    params: dict
    state: str = "running"
    attempts: int = 0
    pid: int | None = None
    gpu: str | None = None
    exit_code: int | None = None
    started: float | None = None
    ended: float | None = None


def write_json(path: Path, value) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1).encode())


class SweepDir:
    """sweep.json (the sweep and its id), trials/<id>.json|.yaml|.log, runs/<id>/ (each trial's out_dir)."""

    def __init__(self, root: Path):
        self.root, self.trials_dir, self.runs_dir = Path(root), Path(root) / "trials", Path(root) / "runs"

    def create_or_check(self, sweep: dict, source: str) -> dict:
        info_path = self.root / "sweep.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info["sweep"] != sweep:
                raise UserError(f"{self.root} holds a sweep started from a different config ({info['source']}); "
                                f"restore that file or use a new --sweep_dir")
            return info
        self.trials_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(exist_ok=True)
        info = {"id": random_id(), "name": sweep.get("name") or Path(source).stem, "source": str(source),
                "created": time.time(), "sweep": sweep}
        write_json(info_path, info)
        return info

    def info(self) -> dict:
        try:
            return json.loads((self.root / "sweep.json").read_text())
        except OSError:
            raise UserError(f"{self.root} is not a sweep dir (no sweep.json)") from None

    def lock(self):
        fh = open(self.root / ".lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another sweep.py is running on {self.root}; wait for it or stop it") from None
        return fh

    def trials(self) -> list[Trial]:
        found = [Trial(**json.loads(p.read_text())) for p in self.trials_dir.glob("*.json")]
        return sorted(found, key=lambda t: t.number)

    def save(self, trial: Trial) -> None:
        write_json(self.trials_dir / f"{trial.id}.json", asdict(trial))

    def out_dir(self, trial: Trial) -> Path:
        return self.runs_dir / trial.id

    def log_path(self, trial: Trial) -> Path:
        return self.trials_dir / f"{trial.id}.log"


def varied_keys(sweep: dict) -> list[str]:
    return [k for k, spec in sweep["parameters"].items() if "value" not in spec]


def short(value) -> str:
    """A value as the console shows it: floats to 4 significant digits (lr=0.0008996, not 0.0008995784230731146)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def leaderboard(sweep: dict, sdir: SweepDir) -> list[dict]:
    """One row per trial, best first by the sweep metric (trials without it last)."""
    metric = (sweep.get("metric") or {}).get("name")
    sign = -1 if (sweep.get("metric") or {}).get("goal", "minimize") == "maximize" else 1
    rows = []
    for t in sdir.trials():
        _, summary = read_local(sdir.out_dir(t))
        value = summary.get(metric)
        checkpoints = sorted(sdir.out_dir(t).glob("**/best.safetensors"))
        rows.append({"run_id": t.id, "state": t.state, "metric": value if isinstance(value, (int, float)) else None,
                     **{k: t.params.get(k) for k in varied_keys(sweep)},
                     "checkpoint": str(checkpoints[0]) if len(checkpoints) == 1 else
                     f"{sdir.out_dir(t)}/fold*/best.safetensors" if checkpoints else ""})
    rows.sort(key=lambda r: (r["metric"] is None, sign * (r["metric"] or 0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def write_leaderboard(sweep: dict, sdir: SweepDir) -> list[dict]:
    """The leaderboard, also as sdir/leaderboard.csv."""
    rows = leaderboard(sweep, sdir)
    if rows:
        with open(sdir.root / "leaderboard.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, list(dict.fromkeys(["rank", *rows[0]])))  # rank first, once
            writer.writeheader()
            writer.writerows(rows)
    return rows
