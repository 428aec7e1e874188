"""The ``clipfold`` command: one module per command group, each calling a public function of :mod:`clipfold`.

A ``ClipfoldError`` is printed as one ``error: ...`` line and exits non-zero, no traceback. The compile
stack (torch) is imported only by the commands that need it, and by the --help of those whose defaults
live in it. Shared options and their words (--top-k, --overwrite, --variant, --threads, --json,
--backend, --device, --max-delay-ms) are defined once, in :mod:`clipfold.cli.options`.
"""

from __future__ import annotations

import argparse
import sys

from clipfold.cli import compile_cmd, export_cmd, fit_cmd, index_cmd, options, profile_cmd, run_cmd, serve_cmd
from clipfold.errors import ClipfoldError

# In the order `clipfold --help` lists them: compile, fit, run, measure, retrieve, serve, hand over.
COMMAND_GROUPS = (compile_cmd, fit_cmd, run_cmd, profile_cmd, index_cmd, serve_cmd, export_cmd)

EXAMPLES = """examples:
  clipfold compile --labels cat,dog,car --out pets.bundle
  clipfold classify pets.bundle photo.jpg --top-k 3
  clipfold serve pets.bundle"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipfold", description="compile CLIP models and their adaptations into "
                                     "verified bundles, and run them", epilog=EXAMPLES,
                                     formatter_class=options.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, every default resolved (``args.defaulted`` names the options not given)."""
    return options.resolve_defaults(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except ClipfoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
