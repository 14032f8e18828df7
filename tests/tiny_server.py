"""Run ``asyncspade serve`` around a tiny random model, for the server tests (no model weights needed).

Same flags and the same code path as ``asyncspade serve`` except the model: ``tiny_model("llama", seed=0)`` with
the test suite's ``lively`` weights (varied greedy outputs, so equality checks can fail).
The process exits by itself when its parent (the test run) dies, so a killed pytest leaves no server behind.
"""
import argparse
import os
import sys
import threading
import time

import torch

from asyncspade.cli import serve as server
from asyncspade.models import tiny_model
from conftest import lively        # this script's directory is tests/


def exit_with_parent() -> None:
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    exit_with_parent()
    torch.set_num_threads(1)              # the test machine's cores are shared
    p = argparse.ArgumentParser()
    server.add_arguments(p)
    args = p.parse_args()
    sock = server.bind(args)
    model, tokenizer = tiny_model("llama", seed=0)
    lively(model)
    from asyncspade.server import serve
    serve(server.app_from_args(args, model, tokenizer), sock, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
