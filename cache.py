"""List and clear the cache folder: the decode caches of --cache disk (one .npy per data set and img_size)
and what other commands keep there (predictions, downloaded artifacts and data sets, test-set shift measures).

Usage:
    python cache.py list                           # each decode cache, the subfolders, the total and the bound
    python cache.py clear --decode                 # every decode cache that no running process holds
    python cache.py clear --all --older_than 30    # everything but weights/, unused for 30 days
    python cache.py clear --preds --cache_dir /scratch/cache
train.py keeps the decode caches under --cache_max_gb by itself, least recently used out first; this command
is to look, and to make room by hand. A decode cache that a running process holds is never deleted (said so).
"""
import argparse
import sys
from pathlib import Path

from datasets.cache import default_cache_dir
from utils import UserError, report_error
from workflows.cache import CLEARABLE, FOLDERS, clear, listing
from workflows.flags import HelpFormatter, add_config_flags


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each command's own (its errors print its usage)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    add_config_flags(common, "cache_dir")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,clear}")
    show = commands.add_parser("list", parents=[common], formatter_class=HelpFormatter,
                               help="each decode cache (images x size, size, last use, in use), the subfolders")
    add_config_flags(show, "cache_max_gb")
    wipe = commands.add_parser("clear", parents=[common], formatter_class=HelpFormatter,
                               help="delete what the flags name; at least one of them")
    wipe.add_argument("--all", action="store_true", help=f"all of: {', '.join(CLEARABLE)} (weights/ never)")
    wipe.add_argument("--decode", action="store_true", help="the decode caches (--cache disk)")
    for name in CLEARABLE[1:]:
        wipe.add_argument(f"--{name}", action="store_true", help=f"{name}/: {FOLDERS[name]}")
    wipe.add_argument("--older_than", type=float, default=None, metavar="DAYS",
                      help="only what was last used (decode caches, shift/) or written (the rest) more than DAYS "
                           "days ago; without a flag above: from everything --all names")
    return parser, {"list": show, "clear": wipe}


def main(argv=None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    parser = commands[args.command]
    if args.command == "list" and args.cache_max_gb < 0:
        parser.error("--cache_max_gb must be >= 0 (0 = auto)")
    if args.command == "clear":
        what = {name for name in CLEARABLE if args.all or getattr(args, name)}
        if args.older_than is not None and args.older_than < 0:
            parser.error("--older_than must be >= 0 days")
        if not what and args.older_than is None:
            parser.error(f"say what to clear: --all, {', '.join('--' + n for n in CLEARABLE)} or --older_than DAYS")
        what = what or set(CLEARABLE)
    root = Path(args.cache_dir or default_cache_dir()).expanduser()
    try:
        if not root.is_dir():
            if args.cache_dir or root.exists():
                raise UserError(f"--cache_dir {root}: {'not a folder' if root.exists() else 'no such folder'}")
            print(f"nothing cached: {root} does not exist yet")
            return 0
        lines = listing(root, args.cache_max_gb) if args.command == "list" else clear(root, what, args.older_than)
    except (UserError, OSError) as e:
        return report_error(e)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
