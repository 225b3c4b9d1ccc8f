"""Config fields as command-line flags: train.py's parser, any command's shared flags, the help's layout.

Usage: cfg = parse_config(sys.argv[1:])                  # defaults < --config FILE.yaml < --key=value
       add_config_flags(parser, "tta", "device", required=("data",), batch_size=64)   # another command's flags
Every field is a CLI flag of the same snake_case name, the name `wandb agent` passes and `sweep.yaml` uses.
"""
import argparse
import dataclasses
import textwrap

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


def _add_field_flag(parser, f: dataclasses.Field, default=dataclasses.MISSING, required: bool = False) -> None:
    """The one place a Config field becomes a flag: --<name> with the field's conversion, choices and help.
    A script whose default differs from train.py's passes its own, and the help says so."""
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
    parser.add_argument(f"--{f.name}", type=convert, default=default, required=required, choices=config.choices_of(f),
                        metavar=convert.__name__.upper(), help=text.replace("%", "%%"))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", formatter_class=HelpFormatter, allow_abbrev=False,
        description="Train an image classifier; every run is a W&B run. Flags accept --key=value and --key value.")
    parser.add_argument("--config", default=None, help="YAML file of key: value overrides (below the CLI)")
    add_config_flags(parser, *(f.name for f in dataclasses.fields(Config)))
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """defaults < --config FILE.yaml < CLI. Exits with a usage message on an unknown or malformed key."""
    parser = build_parser()
    pre_parser = argparse.ArgumentParser(add_help=False)  # only to find --config
    pre_parser.add_argument("--config")
    pre, _ = pre_parser.parse_known_args(argv)
    if pre.config:
        try:
            with open(pre.config) as fh:
                from_file = yaml.safe_load(fh) or {}
        except OSError as e:
            parser.error(f"--config {pre.config}: {e.strerror}")
        except yaml.YAMLError as e:  # the file and line, not a traceback
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            parser.error(f"--config {pre.config}:{where} is not YAML ({getattr(e, 'problem', None) or e}); "
                         f"write one `key: value` per line")
        if not isinstance(from_file, dict):
            parser.error(f"--config {pre.config}: expected a mapping of key: value")
        if nested := [k for k, v in from_file.items() if isinstance(v, dict)]:
            parser.error(f"--config {pre.config}: {nested[:5]} hold a mapping; the config is flat, one `key: value` "
                         f"per line (a list is written [a, b])")
        try:
            parser.set_defaults(**Config.from_dict(from_file).to_dict())
        except UserError as e:
            parser.error(f"--config {pre.config}: {e}")
    args = vars(parser.parse_args(argv))
    args.pop("config")
    try:
        return Config.from_dict(args)
    except UserError as e:
        parser.error(str(e))
