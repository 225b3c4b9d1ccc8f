"""Config: CLI forms, booleans, unknown keys, precedence defaults < file < CLI < sweep-locked."""
import dataclasses
import json

import pytest
import yaml

from utils import UserError, tracking
from workflows.config import ADDED_CONFIG_KEYS, Config
from workflows.flags import build_parser, parse_config


@pytest.mark.parametrize("text,expected", [("True", True), ("False", False), ("true", True), ("false", False),
                                           ("1", True), ("0", False)])
def test_booleans(text, expected):
    assert parse_config([f"--pretrained={text}"]).pretrained == str(expected).lower()
    assert parse_config(["--amp", text]).amp is expected


def test_flags_as_timm_and_lightning_users_type_them():
    cfg = parse_config(["--batch-size", "16", "--ema", "--no-amp", "--img-size=64", "--pretrained", "--sam=True"])
    assert (cfg.batch_size, cfg.ema, cfg.amp, cfg.img_size, cfg.pretrained, cfg.sam) == (16, True, False, 64, "true",
                                                                                          True)
    assert parse_config(["--no-pretrained", "--ema", "False"]).pretrained == "false"
    assert parse_config(["--ema=True"]).ema is True  # what wandb agent passes
    assert parse_config(["--device", "cuda:1"]).device == "cuda:1"


@pytest.mark.parametrize("argv, hint", [(["--lr_rate", "0.01"], "did you mean --lr"),
                                        (["--batchsize=8"], "did you mean --batch_size"),
                                        (["--ema", "maybe"], "as bool: not a boolean"),
                                        (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N")])
def test_a_mistyped_flag_gets_a_hint_and_a_one_line_usage(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and hint in err and "<class" not in err
    assert len(err.strip().splitlines()) == 2  # usage and the error, not every flag


def test_help_groups_the_flags_by_section_with_the_common_ones_first(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    titles = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles[:3] == ["options", "common flags", "data"] and {"optimization", "loss", "W&B"} <= set(titles)
    assert out.index("--lr FLOAT") < out.index("--image_col")


def test_every_flag_of_every_command_says_what_it_does():
    from test_docs import _script_parsers, _scripts
    parsers = {"train.py": [build_parser()], **{name: _script_parsers(path) for name, path in _scripts().items()}}
    silent = [f"{name} {a.option_strings[0]}" for name, ps in parsers.items() for p in ps for a in p._actions
              if a.option_strings and not a.help]
    assert not silent


def test_both_flag_forms_and_types():
    cfg = parse_config(["--lr=0.01", "--epochs", "3", "--model", "resnet18", "--img_size=96"])
    assert (cfg.lr, cfg.epochs, cfg.model, cfg.img_size) == (0.01, 3, "resnet18", 96)
    assert isinstance(cfg.epochs, int) and isinstance(cfg.lr, float)


# --epoch: no abbreviations, a sweep typo must fail
@pytest.mark.parametrize("argv", [["--learning_rate=0.1"], ["--lr"], ["--pretrained=maybe"], ["--epochs=2.5"],
                                  ["--loss=nope"], ["--wandb_mode=cloud"], ["--lr=-1"], ["--folds=5", "--fold=5"],
                                  ["--epoch=3"], ["--aug_strength=1.5"], ["--mix_prob=2"], ["--accum_steps=0"],
                                  ["--sam_rho=0"], ["--ema_decay=1"], ["--label_smoothing=1"],
                                  ["--batch_size=33", "--mixup=0.2"], ["--sampler=balanced"], ["--tta=d8"],
                                  ["--augmix=1.5"]])
def test_bad_flags_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert argv[-1].split("=")[0].lstrip("-") in capsys.readouterr().err  # the message names the key


def test_help_lists_every_key_with_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in text
        assert f"(default: {f.default})" in text or (f.default == "" and "(default: )" in text)


def test_help_explains_every_registered_choice(capsys):
    from datasets import SAMPLERS
    from datasets.transforms import AUGS, TTA
    from losses import LOSSES
    from optim import OPTIMIZERS, SCHEDULERS
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for table in (LOSSES, OPTIMIZERS, SCHEDULERS, SAMPLERS, AUGS, TTA):
        for name, fn in table.items():
            assert fn.__doc__, f"{table.kind} {name!r} needs a docstring: --help shows it"
            assert f"{name}: {' '.join(fn.__doc__.split())[:30]}" in text


def test_file_below_cli(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.1, "epochs": 7, "pretrained": "true"}))
    cfg = parse_config(["--config", str(path), "--lr=0.2"])
    assert (cfg.lr, cfg.epochs, cfg.pretrained) == (0.2, 7, "true")


def test_a_run_record_replays_without_its_folder_and_with_what_this_version_lacks_left_out(tmp_path, capsys):
    record = {"run_id": "abc12345", "config": Config(lr=0.01, epochs=3, out_dir="old", resume="auto", restart=True,
                                                       run_name="first").to_dict() | {"gone_key": 1}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    cfg = parse_config(["--config", str(tmp_path / "run.json"), "--epochs=5"])
    assert (cfg.lr, cfg.epochs, cfg.out_dir, cfg.restart, cfg.run_name) == (0.01, 5, "", False, "")
    assert cfg.parent == str(tmp_path) and cfg.resume == Config().resume
    out = capsys.readouterr().out
    assert "replaying run abc12345" in out and "['gone_key']" in out
    with pytest.raises(SystemExit):  # a folder without a run's record
        parse_config(["--config", str(tmp_path / "nothing")])
    assert f"--config {tmp_path / 'nothing'}: No such file" in capsys.readouterr().err


def test_file_with_unknown_key_fails(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("lr: 0.1\nlearning_rate: 0.3\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert "learning_rate" in capsys.readouterr().err


def test_sweep_locked_value_wins(tmp_path, monkeypatch):
    """wandb.init applies WANDB_SWEEP_PARAM_PATH (what `wandb agent` sets) over our config; we read it back."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"lr": {"value": 0.5}, "epochs": {"value": 4}}))
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    cfg = parse_config(["--lr=0.2", "--epochs=9", "--batch_size=16"])
    run = tracking.init(cfg.to_dict(), "lockedrun", tmp_path / "out", mode="offline")
    try:
        back = Config.from_dict(run.config(exclude=ADDED_CONFIG_KEYS))
    finally:
        run.finish()
    assert (back.lr, back.epochs, back.batch_size) == (0.5, 4, 16)


def test_from_dict_coerces_and_refuses():
    cfg = Config.from_dict({"lr": "0.01", "epochs": 3.0, "pretrained": "False", "run_name": None})
    assert (cfg.lr, cfg.epochs, cfg.pretrained, cfg.run_name) == (0.01, 3, "false", "")
    with pytest.raises(UserError, match="extra_key"):
        Config.from_dict({"extra_key": 1})
    with pytest.raises(UserError, match="epochs"):
        Config.from_dict({"epochs": 2.5})


def test_monitor_direction():
    assert Config().maximize and not Config(monitor="val/loss").maximize
    assert Config(monitor="val/loss", monitor_mode="max").maximize


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.resolve_mode("auto") == "offline"  # no key anywhere: offline, never a prompt
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto") == "disabled"
    assert tracking.resolve_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.resolve_mode("auto") == "online"


def test_parser_flags_match_fields():
    flags = {a.dest for a in build_parser()._actions} - {"help", "config", "check"}
    assert flags == {f.name for f in dataclasses.fields(Config)}
