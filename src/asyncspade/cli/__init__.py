"""``asyncspade generate | serve | bench | demo | eval {fidelity,passkey,math,report}``.

:mod:`.dispatch` dispatches (and is imported by nothing but the entry point); :mod:`.args` holds the flags and helpers
the commands share; each command is its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from .args import UserError, add_model_args, add_sparse_args, int_list, load, methods_from_args, sparse_from_args


def main(argv: list[str] | None = None) -> int:
    """The ``asyncspade`` console entry point (the dispatcher loads on call, so importing the package stays light)."""
    from .dispatch import main as dispatch
    return dispatch(argv)


def build_parser(argv: list[str] | None = None):
    from .dispatch import build_parser as build
    return build(argv)


__all__ = ["UserError", "add_model_args", "add_sparse_args", "build_parser", "int_list", "load", "main",
           "methods_from_args", "sparse_from_args"]
