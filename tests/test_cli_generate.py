"""``asyncspade generate``: JSON and streamed output, stdin prompts, and one-line errors (exit 2, no traceback)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from asyncspade import cli
from asyncspade.cli import generate as gen
from asyncspade.config import SparseConfig
from asyncspade.engine import Engine
from asyncspade.models import encode_prompt, load_model
from asyncspade.sampling import SamplingParams

KEYS = {"text", "tokens", "ttft_s", "tpot_s", "method", "prompt_tokens", "finish_reason"}
PROMPT = "Write a short poem about the sea, the wind and the old lighthouse keeper who watches them."
SPARSE = ["--method", "oracle", "--budget", "32", "--sink", "4", "--recent", "8", "--dense-layers", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")      # tiny tensors: see conftest.one_thread


def main(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(["generate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_has_the_keys_and_matches_the_engine(tiny_dir, capsys):
    rc, out, _ = main(capsys, "--model", tiny_dir, "--dtype", "fp32", "--prompt", PROMPT, "--max-new-tokens", "12",
                      "--json", *SPARSE)
    assert rc == 0
    res = json.loads(out)
    assert set(res) == KEYS
    model, tok = load_model(tiny_dir, torch.float32)
    ids = encode_prompt(tok, PROMPT, chat=True)
    assert res["prompt_tokens"] == len(ids) > 32          # prompt beyond the budget: decoding was sparse
    eng = Engine(model, tok, SparseConfig(method="oracle", budget=32, sink=4, recent=8, dense_layers=1), max_batch=1)
    seq = eng.add(ids, SamplingParams(max_tokens=12))
    eng.run([seq])
    eng.close()
    assert (res["text"], res["tokens"], res["finish_reason"]) == (seq.text, len(seq.output_ids), seq.finish_reason)
    assert res["method"] == "oracle" and res["ttft_s"] > 0 and res["tpot_s"] >= 0


def test_stream_stdin_and_raw_text(tiny_dir, capsys, monkeypatch):
    args = ["--model", tiny_dir, "--dtype", "fp32", "--max-new-tokens", "6", *SPARSE]
    rc, out, _ = main(capsys, *args, "--prompt", PROMPT, "--json")
    chat = json.loads(out)
    expected = chat["text"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    rc, out, err = main(capsys, *args)                              # no --prompt: read stdin, stream
    assert rc == 0
    assert out.rstrip("\n") == expected and out.endswith("\n")
    assert "[asyncspade] 6 tokens" in err and "TTFT" in err and "method oracle (budget 32)" in err
    rc, out, _ = main(capsys, *args, "--prompt", PROMPT, "--no-chat", "--json")
    assert rc == 0 and json.loads(out)["prompt_tokens"] < chat["prompt_tokens"]     # no chat template around it


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "hi", "--method", "nope"], "unknown method 'nope'"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--prompt", "hi", "--max-new-tokens", "8", "--max-model-len", "8"], "--max-model-len (8) must exceed"),
    (["--prompt", "hi", "--budget", "10"], "budget (10) must exceed sink + recent"),
    (["--prompt", "  \n"], "empty prompt"),
    (["--prompt", "-"], "empty prompt"),                         # stdin (empty here)
])
def test_bad_input_fails_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(gen, "load", lambda args: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, err = main(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("asyncspade: error: ") and err.count("\n") == 1 and message in err


def test_bad_model_and_overlong_prompt(tiny_dir, capsys, tmp_path):
    rc, _, err = main(capsys, "--prompt", "hi", "--model", str(tmp_path / "missing"))
    assert rc == 2 and "model not found" in err and err.count("\n") == 1
    rc, _, err = main(capsys, "--prompt", PROMPT, "--model", tiny_dir, "--max-model-len", "16", "--max-new-tokens", "8",
                      "--method", "full")
    assert rc == 2 and "exceeds the context of 16 tokens" in err


def test_subprocess_error_has_no_traceback(tiny_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "asyncspade", "generate", "--model", tiny_dir, "--prompt", PROMPT,
                        "--max-model-len", "16", "--max-new-tokens", "8", "--method", "full"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("[asyncspade]")]   # minus the loading line
    assert lines == [lines[0]] and lines[0].startswith("asyncspade: error: prompt (")
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_bundled_model_json(capsys):
    rc, out, err = main(capsys, "--prompt", "What is 2 + 3?", "--max-new-tokens", "8", "--json", "--method", "full")
    assert rc == 0 and "[asyncspade] loading" in err
    res = json.loads(out)
    assert set(res) == KEYS and 1 <= res["tokens"] <= 8 and res["text"].strip()
    assert res["finish_reason"] in ("stop", "length") and res["prompt_tokens"] > 8


@pytest.mark.slow
def test_bundled_model_generate_prints_no_deprecation_warning():
    """Every warning category a future transformers release uses for renamed APIs is switched on; decoding through
    the sparse path (budget below the prompt) with the default selector must not trigger any of them."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-W", "always::DeprecationWarning",
                        "-W", "always::PendingDeprecationWarning", "-m", "asyncspade", "generate",
                        "--prompt", PROMPT, "--max-new-tokens", "8", "--method", "asyncspade", "--budget", "32",
                        "--sink", "4", "--recent", "8"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr, p.stderr
    assert "[asyncspade] 8 tokens" in p.stderr or "finish stop" in p.stderr


def test_non_utf8_argument_or_stdin_is_one_line_before_loading(tiny_dir):
    """Item 12: bytes that are not UTF-8 in argv or on stdin gave a 20-line traceback after the model load."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "asyncspade", "generate", "--model", tiny_dir, "--max-new-tokens", "2"]
    for extra, stdin, what in (([b"--prompt", b"caf\xe9 \xff"], b"", "--prompt"),
                               ([], b"hello \xff\xfe there", "stdin")):
        p = subprocess.run(cmd + extra, input=stdin, capture_output=True, env=env, timeout=300)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 2 and p.stdout == b"", err
        assert err.count("\n") == 1 and err.startswith("asyncspade: error: ") and what in err, err
        assert "not valid UTF-8" in err and "loading" not in err and "Traceback" not in err


def test_help_shows_every_default(capsys):
    """Item 13: every flag's default is in --help (the method, bench's lists and counts were not)."""
    def entries(*argv) -> dict[str, str]:
        """flag -> its help text, whitespace-normalised."""
        with pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        out, flags, current = capsys.readouterr().out, {}, None
        for line in out.split("usage:", 1)[1].split("\n\n", 1)[1].splitlines():
            if line.lstrip().startswith("-"):
                current = line.split()[0].rstrip(",")
                flags[current] = line
            elif current:
                flags[current] += " " + line
        return {k: " ".join(v.split()) for k, v in flags.items()}
    bench = entries("bench")
    for flag, default in (("--methods", "full,quest,oracle,lastq,asyncspade"), ("--contexts", "4096,16384"),
                          ("--batches", "1"), ("--steps", "16"), ("--warmup", "3"), ("--rounds", "2"),
                          ("--threads", "2"), ("--fill", "2048"), ("--method", None)):
        if default is None:
            assert flag not in bench
        else:
            assert f"(default {default}" in bench[flag], (flag, bench[flag])
    generate = entries("generate")
    assert "(default asyncspade)" in generate["--method"]
    assert "--max-model-len" in generate and "--max-context" not in generate          # one name, vLLM's
    serve = entries("serve")
    assert "--max-model-len" in serve and "--max-tokens-context" not in serve
    assert "dist" in serve["--selector"] and "(default 4 MiB)" in serve["--max-request-bytes"]


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "hi", "--page-size", "0"], "page size must be a positive number"),
    (["--prompt", "hi", "--method", "quest", "--budget", "128", "--page-size", "48"], "page size (48) to divide"),
])
def test_config_messages_are_true(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(gen, "load", lambda args: pytest.fail("the model was loaded"))
    rc, _, err = main(capsys, *argv)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_full_has_no_budget_and_a_long_context_warns(tiny_dir, capsys, tmp_path):
    """Item 13: `--method full --budget 0` is fine (full attends everything); --max-model-len past the model's
    positions is allowed with a warning; --json PATH writes the object there."""
    out = tmp_path / "r.json"
    rc, stdout, err = main(capsys, "--model", tiny_dir, "--prompt", PROMPT, "--max-new-tokens", "3", "--method",
                           "full", "--budget", "0", "--max-model-len", "5000", "--json", str(out))
    assert rc == 0, err
    assert stdout == "" and json.loads(out.read_text())["tokens"] == 3
    assert "warning: --max-model-len 5000 exceeds the model's 4096 positions" in err
