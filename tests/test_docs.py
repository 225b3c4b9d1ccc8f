"""The docs name only flags that exist: every `--flag` in README.md and docs/*.md is accepted by the command it is
given to (train.py, sweep.py, predict.py, ..., benchmarks/*.py, python -m datasets.digits, wandb, torchrun), and
every relative link in them leads to a file (and a heading) that is there.

The flags come from the parser objects themselves, without importing the commands: importing any of them imports
torch, torchvision and scikit-learn (about 5 s on 2 cores). train.py's parser is workflows.flags.build_parser (a
cheap module; the registries that give the keys' valid values are not asked). Each other command's parser is built
by running its own parser code, read from its source: the function (or the `__main__` block) that creates the
ArgumentParser, up to the parse_args call, with argparse, workflows.config and workflows.flags real, constants
read from the source, and anything else (a path, a dict of functions) an inert stand-in. wandb's flags come from
its click commands."""
import argparse
import ast
import dataclasses
import os
import re
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import workflows.config
import workflows.flags

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_DIRS = {".venv", "tests", "runs", "wandb", "sweeps", "docs", "__pycache__"}
# torchrun's flags (as torch.distributed.run's parser has them; importing torch to read it costs seconds)
TORCHRUN = {"--standalone", "--nproc_per_node", "--nproc-per-node", "--nnodes", "--help"}
PLACEHOLDERS = {"--key"}  # `train.py --key=value ...`: any key, as the sweep agent passes them
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
PARSE = ("parse_args", "parse_known_args", "parse_intermixed_args")


class _Parsed(Exception):
    """Raised by parse_args: the parser is built, nothing after it runs."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


class _StandIn:
    """A name the parser code uses that cannot be read without importing its module: empty and inert."""

    def __iter__(self):
        return iter(())

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __getitem__(self, key):
        return self


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its subcommands' parsers."""
    out = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out


def _calls(node: ast.AST, names) -> bool:
    return any(isinstance(n, ast.Call) and (getattr(n.func, "attr", None) in names or getattr(n.func, "id", None)
                                            in names) for n in ast.walk(node))


def _until_parsed(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements up to and including the first one that parses: nothing after it is run."""
    for i, stmt in enumerate(body):
        if _calls(stmt, PARSE):
            return body[:i + 1]
    return body


def _module_file(module: str) -> Path | None:
    path = ROOT / module.replace(".", "/")
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def _constant(path: Path | None, name: str):
    """The literal a module assigns to name at its top level, else a stand-in."""
    if path is not None:
        for stmt in ast.parse(path.read_text()).body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] \
                if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                try:
                    return ast.literal_eval(stmt.value)
                except ValueError:
                    break
    return _StandIn()


def _namespace(path: Path, tree: ast.Module) -> dict:
    """The script's top-level names, as far as they can be had without importing it."""
    ns = {"__name__": "__main__", "__file__": str(path), "__doc__": ast.get_docstring(tree, clean=False)}
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                top = alias.name.split(".")[0]
                ns[alias.asname or top] = __import__(top) if top in sys.stdlib_module_names else _StandIn()
        elif isinstance(stmt, ast.ImportFrom) and stmt.module:
            real = {"workflows.config": workflows.config, "workflows.flags": workflows.flags}.get(stmt.module)
            if real is None and stmt.module.split(".")[0] in sys.stdlib_module_names:
                real = __import__(stmt.module, fromlist=["_"])
            for alias in stmt.names:
                ns[alias.asname or alias.name] = (getattr(real, alias.name) if real is not None
                                                  else _constant(_module_file(stmt.module), alias.name))
        elif isinstance(stmt, ast.Assign | ast.AnnAssign):
            for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                if isinstance(target, ast.Name):
                    ns[target.id] = _constant(path, target.id)
        elif isinstance(stmt, ast.FunctionDef | ast.ClassDef):
            ns[stmt.name] = _StandIn()
    return ns


def _script_parsers(path: Path) -> list[argparse.ArgumentParser]:
    """The parsers a script builds: each top-level function that creates one, called, and the module's (or its
    `__main__` block's) statements that create one, run, each stopped at its parse_args."""
    tree = ast.parse(path.read_text())
    ns = _namespace(path, tree)
    makes = lambda node: _calls(node, ("ArgumentParser",))
    functions = [s for s in tree.body if isinstance(s, ast.FunctionDef) and makes(s)]
    chunks = []
    mains = [s.body for s in tree.body if isinstance(s, ast.If) and "__main__" in ast.unparse(s.test)]
    for body in [tree.body, *mains]:
        code = [s for s in body if not isinstance(s, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.ClassDef
                                                   | ast.If)]
        start = next((i for i, s in enumerate(code) if makes(s)), None)
        if start is not None:
            chunks.append(_until_parsed(code[start:]))
    for f in functions:
        f.body, f.decorator_list = _until_parsed(f.body), []
        exec(compile(ast.Module([f], []), str(path), "exec"), ns)

    parsers = []

    def captured(self, *args, **kwargs):
        raise _Parsed(self)
    with mock.patch.multiple(argparse.ArgumentParser, **dict.fromkeys(PARSE, captured)):
        runs = [lambda f=f: ns[f.name]() for f in functions]
        runs += [lambda c=c: exec(compile(ast.Module(c, []), str(path), "exec"), ns) for c in chunks]
        for run in runs:
            try:
                made = run()
            except _Parsed as e:
                parsers.append(e.parser)
                continue
            made = made if isinstance(made, tuple | list) else [made]
            parsers += [p for p in made if isinstance(p, argparse.ArgumentParser)]
    return parsers


def _scripts() -> dict[str, Path]:
    """Every command with a parser of its own, by its path from the root ("benchmarks/hard.py")."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for path in (Path(folder) / f for f in sorted(files) if f.endswith(".py")):
            name = path.relative_to(ROOT).as_posix()
            if name != "workflows/flags.py" and "ArgumentParser(" in path.read_text():  # flags.py: train.py's
                out[name] = path
    return out


@cache
def known_flags() -> dict[str, set[str]]:
    """command -> the flags it accepts: the repo's commands, wandb's subcommands, torchrun, sbatch's one named."""
    flags = {}
    # the registries that give the keys' valid values (and their help) import torch: not asked
    with mock.patch.multiple(workflows.config, choices_of=lambda f: None, describe_choices=lambda f: ""):
        flags["train.py"] = _options(workflows.flags.build_parser())
        assert flags["train.py"] >= {f"--{f.name}" for f in dataclasses.fields(workflows.config.Config)}
        for name, path in _scripts().items():
            parsers = _script_parsers(path)
            assert parsers, f"{name}: no parser found in it"
            flags[name] = set().union(*map(_options, parsers))
    from wandb.cli import cli as wandb_cli

    def click_flags(command) -> set[str]:
        out = {o for p in command.params for o in p.opts + p.secondary_opts if o.startswith("--")} | {"--help"}
        for sub in getattr(command, "commands", {}).values():
            out |= click_flags(sub)
        return out
    for name, command in wandb_cli.cli.commands.items():
        flags[f"wandb {name}"] = click_flags(command)
    flags["wandb"] = click_flags(wandb_cli.cli)
    flags["torchrun"] = TORCHRUN
    flags["sbatch"] = {"--signal"}  # SLURM's, named for a scheduler's preemption notice (docs/wandb.md)
    flags["pytest"] = flags["venv"] = set()  # none named today: a long flag of theirs fails here, to be added
    return flags


def _command(token: str, following: str, flags: dict) -> str | None:
    """The command a token starts, if it starts one."""
    if token.endswith(".py"):
        token = token.removeprefix("./")
        matches = [token] if token in flags else [name for name in flags if name.endswith("/" + token)]
        return matches[0] if len(matches) == 1 else f"{token} (no such command)"
    module = token.replace(".", "/") + ".py"
    if "." in token and module in flags:
        return module
    if token == "wandb":
        return f"wandb {following}" if f"wandb {following}" in flags else "wandb"
    return token if token in ("torchrun", "sbatch") else None


def doc_flags(text: str, flags: dict) -> list[tuple[int, str, str | None]]:
    """(line, --flag, the command it is given to or None) for every flag in a markdown text. In a code block's line
    and in an inline code span, a flag belongs to the command named before it (`python ensemble.py --top 3`,
    `torchrun --standalone train.py --data D`); elsewhere to none."""
    found = []
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))

    def scan(segment: str, offset: int, commands: bool):
        command, position = None, offset
        parts = re.split(r"([\s|&;()\[\],\"'`=]+)", segment)  # words at even places, what separates them between
        words = parts[::2]
        for i, token in enumerate(parts):
            w = i // 2
            if i % 2 == 0 and token == "#":  # a comment names no command
                command = None
            elif i % 2 == 0 and token and commands and not token.startswith("-"):
                previous, following = (words[w - 1] if w else ""), next((x for x in words[w + 1:] if x), "")
                started = token if previous == "-m" and token in ("pytest", "venv") else \
                    _command(token, following, flags)
                command = started or command
            if i % 2 == 0:
                found.extend((text.count("\n", 0, position) + 1, flag, command) for flag in FLAG.findall(token))
            position += len(token)

    fenced = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)  # indented too: in a list item
    for block in fenced.finditer(text):
        offset = block.start(1)
        for line in block.group(1).split("\n"):
            scan(line, offset, True)
            offset += len(line) + 1
    prose = fenced.sub(blank, text)
    for span in re.finditer(r"`([^`]+)`", prose):
        scan(span.group(1), span.start(1), True)
    scan(re.sub(r"`[^`]+`", blank, prose), 0, False)
    return found


def unknown_flags(text: str, flags: dict) -> list[str]:
    anywhere = set().union(*flags.values()) | PLACEHOLDERS
    bad = []
    for line, flag, command in doc_flags(text, flags):
        accepted = flags.get(command, set()) | PLACEHOLDERS if command else anywhere
        if flag not in accepted:
            bad.append(f"line {line}: {flag} ({command or 'no command named: checked against every command'})")
    return bad


def test_every_flag_in_the_docs_exists():
    flags = known_flags()
    assert len(flags["train.py"]) > 80 and "--count" in flags["sweep.py"] and "--preds" in flags["cache.py"]
    assert "--export" in flags["datasets/digits.py"] and "--answers" in flags["benchmarks/reference_loop.py"]
    bad, seen = [], 0
    for doc in DOCS:
        text = doc.read_text()
        seen += len(doc_flags(text, flags))
        bad += [f"{doc.relative_to(ROOT)} {b}" for b in unknown_flags(text, flags)]
    assert seen > 300, f"only {seen} flags read in the docs: is the reader broken?"
    assert not bad, "flags the docs name that their command does not take:\n" + "\n".join(bad)


def test_a_misspelled_flag_is_caught():
    flags = known_flags()
    text = ("Run `python train.py --epochs 3 --no_such_flag 1`, or `python sweep.py --count 2 --epochs 3`:\n\n"
            "```bash\npython ensemble.py runs/a --top 3   # --cv True\n"
            "torchrun --standalone train.py --standalone\n```\n"
            "and `--lr`, `--nonsense`, --bare_typo.\n")
    assert unknown_flags(text, flags) == [
        "line 5: --standalone (train.py)",
        "line 1: --no_such_flag (train.py)",
        "line 1: --epochs (sweep.py)",
        "line 7: --nonsense (no command named: checked against every command)",
        "line 7: --bare_typo (no command named: checked against every command)"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_leads_somewhere():
    bad = []
    for doc in DOCS:
        text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", doc.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in {
                    _slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}:
                bad.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)
