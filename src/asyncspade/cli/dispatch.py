"""The dispatcher: lists every command, imports only the one asked for (a fast ``--help``), and turns user errors
into one line on stderr and exit code 2 (never a traceback)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..config import ConfigError
from .args import Formatter, UserError, check_utf8_args

COMMANDS = {
    "generate": ("asyncspade.cli.generate", "generate text for one prompt (streams tokens, reports TTFT/TPOT)"),
    "serve": ("asyncspade.cli.serve", "OpenAI-compatible HTTP server with continuous batching"),
    "bench": ("asyncspade.bench", "decode speed (TPOT) of the methods side by side, and vs Hugging Face generate"),
    "demo": ("asyncspade.cli.demo", "a long real text continued with full attention and with asyncspade, timed"),
}
EVALS = {
    "fidelity": ("asyncspade.evals.fidelity",
                 "teacher-forced fidelity of sparse vs dense on reasoning traces or prose"),
    "passkey": ("asyncspade.evals.passkey", "pass key retrieval over context lengths and depths"),
    "math": ("asyncspade.evals.math", "math accuracy with several samples per problem and majority voting"),
    "report": ("asyncspade.evals.report", "gather JSON results of a directory into one Markdown report"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only the one named in ``argv`` imports its module (fast ``--help``)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = set(argv[:2])
    parser = argparse.ArgumentParser(prog="asyncspade", formatter_class=Formatter,
                                     description="Query-aware sparse attention whose top-k token selection runs ahead "
                                     "of the decode loop (AsyncSpade). `asyncspade COMMAND --help` explains each "
                                     "command's flags.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"asyncspade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(subparsers, name, mod, help_, wanted):
        p = subparsers.add_parser(name, help=help_, description=help_, formatter_class=Formatter)
        p.set_defaults(_module=mod)
        if wanted:
            importlib.import_module(mod).add_arguments(p)

    for name, (mod, help_) in COMMANDS.items():
        add(sub, name, mod, help_, name in chosen)
    ev = sub.add_parser("eval", help="evaluations: " + ", ".join(EVALS), description="evaluations",
                        formatter_class=Formatter)
    evsub = ev.add_subparsers(dest="eval", required=True, metavar="EVAL")
    for name, (mod, help_) in EVALS.items():
        add(evsub, name, mod, help_, "eval" in chosen and name in chosen)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from ..engine import RequestError
    from ..models import ModelLoadError
    try:
        check_utf8_args(parser, args)
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UserError, ConfigError, RequestError, ModelLoadError, FileNotFoundError) as e:
        print(f"asyncspade: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asyncspade: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
