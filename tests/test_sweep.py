"""sweep.yaml and the offline runner's pieces: validation, and command lines identical to `wandb agent`'s."""
import copy
import functools
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from wandb.sdk.launch.sweeps import utils as wandb_sweep_utils
from wandb.sdk.lib import config_util

import sweep as sweep_cli
from conftest import ROOT
from workflows.config import Config
from workflows.flags import parse_config
from workflows.sweep import agent_command, check_sweep, load_sweep, param_file_text, plain, sweeps_engine
from workflows.sweep_runner import _die_with_parent


@pytest.fixture
def repo_sweep(monkeypatch):
    monkeypatch.chdir(ROOT)  # `program: train.py` is found from the repository root, as under wandb agent
    return load_sweep(ROOT / "sweep.yaml")


def wandb_agent_argv(sweep: dict, params: dict, args_json_file: str) -> list[str]:
    """wandb agent's own expansion (wandb_agent.Agent._command_run), from its importable helpers."""
    command = wandb_sweep_utils.create_sweep_command(copy.deepcopy(sweep.get("command")))
    macros = wandb_sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros |= {"interpreter": ["python"], "program": [sweep["program"]], "args_json_file": [args_json_file],
               "env": ["/usr/bin/env"]}
    argv = []
    for part in map(str, command):
        argv += (macros.get(part[2:-1]) or []) if part.startswith("${") and part.endswith("}") else [part]
    return argv


def test_repo_sweep_uses_train_keys_and_the_monitored_metric(repo_sweep):
    assert repo_sweep["program"] == "train.py" and repo_sweep["method"] == "bayes"
    assert repo_sweep["metric"] == {"name": Config.monitor, "goal": "maximize"}
    assert repo_sweep["early_terminate"]["type"] == "hyperband"
    assert set(repo_sweep["parameters"]) >= {"model", "loss", "lr", "aug_strength", "optimizer", "sampler"}
    assert repo_sweep["parameters"]["lr"]["distribution"] == "log_uniform_values"


def test_each_proposal_is_the_agents_argv_and_train_py_accepts_it(repo_sweep, tmp_path):
    engine, runs = sweeps_engine(), []
    for i in range(6):
        proposal = engine.next_run(repo_sweep, runs)
        params = {k: plain(v["value"]) for k, v in proposal.config.items()}
        argv = agent_command(repo_sweep, params, str(tmp_path / "args.json"))
        assert argv == wandb_agent_argv(repo_sweep, params, str(tmp_path / "args.json"))
        assert argv[:3] == ["/usr/bin/env", "python", "train.py"]
        cfg = parse_config(argv[3:])
        for key, value in params.items():
            assert getattr(cfg, key) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, key) == value
        runs.append(engine.SweepRun(name=f"r{i}", state="finished", config=proposal.config,
                                    summary_metrics={"val/f1_macro": 0.1 * i}, history=[{"val/f1_macro": 0.1 * i}]))
    assert len({r.config["lr"]["value"] for r in runs}) == 6


def test_every_macro_expands_as_wandb_does(monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_EXTRA", "--seed=7")
    sweep = {"program": "train.py", "command": [
        "${env}", "${interpreter}", "-u", "${program}", "${envvar:SWEEP_EXTRA}", "${envvar:NOT_SET}", "${args}",
        "${args_no_equals}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}", "${args_json_file}",
        "${args_append_hydra}", "${args_override_hydra}"]}
    params = {"lr": 0.003, "sam": False, "ema": True, "model": "resnet18", "epochs": 3}
    assert agent_command(sweep, params, "a.json") == wandb_agent_argv(sweep, params, "a.json")


def test_param_file_is_the_agents(tmp_path):
    params = {"lr": 0.003, "sam": False, "model": "resnet18"}
    config_util.save_config_file_from_dict(str(tmp_path / "agent.yaml"), {k: {"value": v} for k, v in params.items()})
    assert param_file_text(params) == (tmp_path / "agent.yaml").read_text()
    assert yaml.safe_load(param_file_text(params))["lr"] == {"value": 0.003}


def _broken(change):
    base = {"program": "train.py", "method": "random", "metric": {"name": "val/f1_macro", "goal": "maximize"},
            "parameters": {"model": {"value": "test_resnet"}, "lr": {"values": [0.001, 0.01]}}}
    change(base)
    return base


BROKEN = [
    ("unknown key", lambda s: s["parameters"].update(learning_rate={"value": 0.1}),
     "parameters.learning_rate: not a train.py key"),
    ("bad choice", lambda s: s["parameters"].update(loss={"values": ["ce", "hinge"]}), "'hinge'"),
    ("out of range", lambda s: s["parameters"].update(aug_strength={"min": 0.0, "max": 2.0}),
     "aug_strength must be in [0, 1]"),
    ("bad schema", lambda s: s.update(method="baye"), "schema: 'baye' is not one of"),
    ("bad distribution", lambda s: s["parameters"].update(lr={"distribution": "log_normal_values", "min": 1}),
     "schema:"),
    ("unknown model", lambda s: s["parameters"].update(model={"values": ["resnet18", "resnet_18"]}),
     "unknown model 'resnet_18'"),
    ("size a model cannot take",
     lambda s: s["parameters"].update(model={"value": "efficientformerv2_s0"}, img_size={"value": 48}),
     "cannot take --img_size 48"),
    ("metric train.py does not report", lambda s: s.update(metric={"name": "val/accuracy", "goal": "maximize"}),
     "not train.py's monitored key"),
    ("goal against the monitor", lambda s: s.update(metric={"name": "val/f1_macro", "goal": "minimize"}),
     "metric.goal"),
    ("bayes without a metric", lambda s: (s.pop("metric"), s.update(method="bayes")),
     "bayes and early_terminate need metric"),
    ("missing program", lambda s: s.update(program="trian.py"), "program: trian.py not found"),
    ("unknown macro", lambda s: s.update(command=["${env}", "${python}", "${program}", "${args}"]),
     "unknown macro ${python}"),
]


@pytest.mark.parametrize("name,change,fragment", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_sweep_is_reported(monkeypatch, name, change, fragment):
    monkeypatch.chdir(ROOT)
    problems = check_sweep(_broken(change))
    assert any(fragment in p for p in problems), problems


def test_valid_base_has_no_problems(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert check_sweep(_broken(lambda s: None)) == []


def test_broken_sweep_fails_before_any_trial(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_broken(lambda s: s["parameters"].update(optimizer={"values": ["adamw", "adamm"]}))))
    code = sweep_cli.main([str(bad), "--count", "2", "--sweep_dir", str(tmp_path / "sw")])
    err = capsys.readouterr().err
    assert code == 1 and "parameters.optimizer: 'adamm'" in err
    assert not (tmp_path / "sw").exists()


def test_set_fixes_a_key_for_every_trial_and_is_checked(monkeypatch, tmp_path, capsys):
    """sweep.py sweep.yaml --count 1 --set epochs=1: a quick try of the shipped sweep, said so; a key train.py does
    not have is refused before any trial starts."""
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(ROOT / "sweep.yaml", {"epochs": 1, "lr": 0.001})
    assert sweep["parameters"]["epochs"] == {"value": 1} and sweep["parameters"]["lr"] == {"value": 0.001}
    assert sweep_cli.main(["sweep.yaml", "--check", "--set", "epochs=1", "--set", "aug_strength=0.5"]) == 0
    assert "every trial: epochs=1, aug_strength=0.5 (--set)" in capsys.readouterr().out
    assert sweep_cli.main(["sweep.yaml", "--check", "--set", "epoch=1"]) == 1
    assert "parameters.epoch: not a train.py key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_cli.main(["sweep.yaml", "--check", "--set", "epochs"])


def test_status_of_a_missing_dir_is_one_line(tmp_path, capsys):
    assert sweep_cli.main(["--status", str(tmp_path / "nothing")]) == 1
    assert "is not a sweep dir" in capsys.readouterr().err



def test_torchrun_command_from_the_docs(monkeypatch):
    """docs/sweeps.md's `command:` for multi-GPU trials passes the checks and expands as wandb agent's."""
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "docs" / "sweeps.md").read_text()
    block = readme[readme.index("```yaml\ncommand:") + len("```yaml\n"):]
    sweep = _broken(lambda s: s.update(yaml.safe_load(block[:block.index("```")])))
    assert check_sweep(sweep) == []
    params = {"lr": 0.003, "model": "resnet18"}
    argv = agent_command(sweep, params, "a.json")
    assert argv == wandb_agent_argv(sweep, params, "a.json")
    assert argv[:5] == ["/usr/bin/env", "torchrun", "--standalone", "--nproc_per_node=2", "train.py"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_trial_forked_as_its_runner_died_does_not_run_on(tmp_path):
    """The runner killed between fork and exec: the trial would be an orphan nobody waits for, running beside
    the attempt the restarted runner launches into the same folder. Here the runner's pid is not the parent."""
    marker = tmp_path / "ran"
    start = time.time()
    proc = subprocess.Popen(["sh", "-c", f"touch {marker}; sleep 30"],
                            preexec_fn=functools.partial(_die_with_parent, os.getpid() + 1_000_000))
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM and time.time() - start < 10 and not marker.exists()
    ok = subprocess.Popen(["sh", "-c", f"touch {marker}"], preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    assert ok.wait(timeout=10) == 0 and marker.exists()
