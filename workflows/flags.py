"""Config fields as command-line flags: train.py's parser, any command's shared flags, the help's layout.

Usage: cfg = parse_config(sys.argv[1:])                  # defaults < --config FILE.yaml|run.json < --key=value
       add_config_flags(parser, "tta", "device", required=("data",), batch_size=64)   # another command's flags
Every field is a CLI flag of the same snake_case name, the name `wandb agent` passes and `sweep.yaml` uses, and
of its dashed spelling (--batch-size, as timm and Lightning spell them); a boolean also takes a bare --ema and
--no-ema. An unknown flag gets "did you mean" and a one-line usage; --help lists the flags by Config's sections.
"""
import argparse
import dataclasses
import difflib
import inspect
import re
import sys
import textwrap
from pathlib import Path

import yaml

from utils import UserError
from workflows import config  # its choices_of and describe_choices, looked up there (a stand-in may replace them)
from workflows.config import Config, coerce


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, keeps the description's lines, and wraps each line of a help text on its
    own, so registry choices stay one per line."""

    def _split_lines(self, text, width):
        return [part for line in text.splitlines()
                for part in textwrap.wrap(line, width, subsequent_indent="    " if line.startswith("  ") else "")
                or [""]]


class CommandParser(argparse.ArgumentParser):
    """train.py's parser: a one-line usage, and "did you mean" for a flag it does not know."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown and (flags := [w.split("=")[0] for w in unknown[1].split() if w.startswith("-")]):
            message = "unrecognized flag " + ", ".join(f + self._near(f) for f in flags)
        sys.stderr.write(f"usage: {self.prog} [--KEY VALUE ...]  (python {self.prog} --help: every flag, by section)\n"
                         f"{self.prog}: error: {message}\n")
        sys.exit(2)

    def _near(self, flag: str) -> str:
        """ (did you mean --x?) for the known flags nearest to flag: one its name starts with (--lr_rate: --lr), or
        one difflib finds close; "" when none is."""
        key = flag.lstrip("-").replace("-", "_")
        known = [a.dest for a in self._actions if a.option_strings and a.help != argparse.SUPPRESS]
        near = [k for k in known if key.startswith(k + "_") or k.startswith(key + "_")]
        near = list(dict.fromkeys(near + difflib.get_close_matches(key, known, n=2, cutoff=0.7)))[:2]
        return f" (did you mean {' or '.join('--' + k for k in near)}?)" if near else ""


def _is_bool(f: dataclasses.Field) -> bool:
    return f.type in (bool, "bool") or bool(f.metadata.get("auto_bool"))


def _add_field_flag(parser, f: dataclasses.Field, default=dataclasses.MISSING, required: bool = False) -> None:
    """The one place a Config field becomes a flag: --<name> (and --<dashed-name>) with the field's conversion,
    choices and help; a boolean also bare (--ema: true) and negated (--no-ema). A script whose default differs
    from train.py's passes its own, and the help says so."""
    def convert(text):
        try:
            return coerce(f, text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = f.type if isinstance(f.type, str) else f.type.__name__  # argparse names it in errors
    text = f.metadata["help"] + config.describe_choices(f)
    if required:
        text, default = text + " (required here)", argparse.SUPPRESS
    elif default is dataclasses.MISSING:
        default = f.default
    elif default != f.default:
        text += f" (train.py's default: {f.default!r})"
    names = list(dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"]))
    flag = {}
    if _is_bool(f):
        on, off = (True, False) if f.type in (bool, "bool") else ("true", "false")
        flag = {"nargs": "?", "const": on}
        text += f" (bare {names[0]}: {str(on).lower()}; --no-{f.name}: {str(off).lower()})"
    parser.add_argument(*names, dest=f.name, type=convert, default=default, required=required,
                        choices=config.choices_of(f), metavar=convert.__name__.upper(), help=text.replace("%", "%%"),
                        **flag)
    if _is_bool(f):
        parser.add_argument(*dict.fromkeys([f"--no-{f.name}", f"--no-{f.name.replace('_', '-')}"]), dest=f.name,
                            action="store_const", const=off, help=argparse.SUPPRESS)


def add_config_flags(parser, *names: str, required: tuple[str, ...] = (), **defaults) -> None:
    """Add --<name> for each named Config field (and each one in `required` or `defaults`), exactly as
    train.py declares it; `defaults` gives a script's own default where it legitimately differs.
    parser: an ArgumentParser or an argument group. Usage:
        add_config_flags(parser, "tta", "device", required=("data",), batch_size=64)"""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name in dict.fromkeys([*names, *required, *defaults]):
        if name not in fields:
            raise KeyError(f"no Config field {name!r}")
        _add_field_flag(parser, fields[name], defaults.get(name, dataclasses.MISSING), name in required)


COMMON = ("data", "model", "img_size", "epochs", "batch_size", "lr", "out_dir", "wandb_mode")  # --help lists first


def sections() -> dict[str, list[str]]:
    """Config's fields by the section comments of its source (`# --- data ---`), in order."""
    out, current = {}, "other"
    for line in inspect.getsource(Config).splitlines():
        if heading := re.match(r"\s*# --- (.+?) ---", line):
            current = heading[1]
        elif name := re.match(r"    (\w+): ", line):
            out.setdefault(current, []).append(name[1])
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="train.py", formatter_class=HelpFormatter, allow_abbrev=False, usage="%(prog)s [--KEY VALUE ...]",
        description="Train an image classifier; every run is a W&B run. Flags accept --key=value, --key value and "
                    "--dashed-key; booleans also --key and --no-key.")
    parser.add_argument("--config", default=None, help="YAML file of key: value overrides (below the CLI), or a "
                        "run folder / its run.json: replays that run (its flags as given) in a new folder")
    parser.add_argument("--check", action="store_true", help="print the resolved plan (data, split, classes, what "
                        "auto comes to, output folder, W&B mode, device) and exit: no run, nothing written")
    add_config_flags(parser.add_argument_group("common flags"), *COMMON)
    fields = {f.name for f in dataclasses.fields(Config)}
    for title, names in sections().items():
        if rest := [n for n in names if n in fields and n not in COMMON]:
            add_config_flags(parser.add_argument_group(title), *rest)
    return parser


REPLAY_DROPPED = ("out_dir", "resume", "restart", "run_name")  # a replay is a new run, in a folder of its own


def read_config_file(path: str) -> dict:
    """--config's values: a YAML file of key: value, or a run's record (runs/<name>/run.json, or the folder) whose
    config replays: what it was given (auto stays auto and is decided again), in a new folder, its parent the run
    replayed. Raises UserError with the file and what to do."""
    file = Path(path) / "run.json" if Path(path).is_dir() else Path(path)
    try:
        values = yaml.safe_load(file.read_text()) or {}  # JSON is YAML
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:  # the file and line, not a traceback
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--config {path}:{where} is not YAML ({getattr(e, 'problem', None) or e}); write one "
                        f"`key: value` per line") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of key: value")
    if isinstance(values.get("config"), dict) and "run_id" in values:  # a run's record: replay it
        known = {f.name for f in dataclasses.fields(Config)}
        if old := sorted(set(values["config"]) - known):
            print(f"--config {path}: keys this version no longer has are left out: {old}")
        replay = {k: v for k, v in values["config"].items() if k in known and k not in REPLAY_DROPPED}
        print(f"--config {path}: replaying run {values['run_id']} (its flags as given; a new run folder)")
        return replay | {"parent": replay.get("parent") or str(file.parent)}
    if nested := [k for k, v in values.items() if isinstance(v, dict)]:
        raise UserError(f"--config {path}: {nested[:5]} hold a mapping; the config is flat, one `key: value` per "
                        f"line (a list is written [a, b])")
    return values


def parse_config(argv: list[str] | None = None) -> Config:
    """defaults < --config FILE.yaml (or a run's run.json: a replay) < CLI. Exits with a usage message on an unknown
    or malformed key."""
    parser = build_parser()
    pre_parser = argparse.ArgumentParser(add_help=False)  # only to find --config
    pre_parser.add_argument("--config")
    pre, _ = pre_parser.parse_known_args(argv)
    if pre.config:
        try:
            parser.set_defaults(**Config.from_dict(read_config_file(pre.config)).to_dict())
        except UserError as e:
            msg = str(e)
            parser.error(msg if msg.startswith("--config") else f"--config {pre.config}: {msg}")
    args = vars(parser.parse_args(argv))
    args.pop("config"), args.pop("check")  # --check: train.main looks for it
    try:
        return Config.from_dict(args)
    except UserError as e:
        parser.error(str(e))
