"""Task evaluations end to end on a tiny model: passkey JSON/plot, math resume, the Markdown report, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared_data

from asyncspade import cli
from asyncspade.evals import math as math_eval
from asyncspade.evals import passkey as passkey_eval
from asyncspade.evals.report import kind_of
from asyncspade.models import bundled_tokenizer

SPARSE = ["--budget", "48", "--sink", "4", "--recent", "8", "--page-size", "8", "--dense-layers", "1"]


def main(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------------------- passkey
def test_passkey_cases_fit_the_context_and_hold_the_needle():
    tok = bundled_tokenizer()
    hay = shared_data("tinyshakespeare.txt").read_text()
    for chat in (False, True):
        cases = passkey_eval.build_cases(tok, hay, [300, 500], [0.0, 1.0], 2, seed=3, new_tokens=6, chat=chat)
        assert len(cases) == 8 and len({c.key for c in cases}) > 1
        for c in cases:
            assert len(c.prompt_ids) + 6 <= c.context
            assert len(c.prompt_ids) + 6 >= c.context - 4          # the haystack fills the context
            assert c.key in tok.decode(c.prompt_ids[c.needle_pos:c.needle_pos + 12])
            assert tok.decode(c.prompt_ids[-c.tail:]).strip().startswith("What is the pass key?")
        again = passkey_eval.build_cases(tok, hay, [300, 500], [0.0, 1.0], 2, seed=3, new_tokens=6, chat=chat)
        assert [c.prompt_ids for c in again] == [c.prompt_ids for c in cases]


def test_passkey_end_to_end_writes_the_schema_and_plot(tiny_dir, tmp_path, capsys):
    out, png = tmp_path / "pk.json", tmp_path / "pk.png"
    rc, stdout, err = main(capsys, "eval", "passkey", "--model", tiny_dir, "--dtype", "fp32", "--context", "192,320",
                           "--depths", "3", "--trials", "2", "--methods", "full,quest,asyncspade,streaming",
                           "--new-tokens", "4", "--haystack", shared_data("tinyshakespeare.txt"), "--json", out,
                           "--plot", png, *SPARSE)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert kind_of(res) == "passkey"
    assert res["settings"]["contexts"] == [192, 320] and res["settings"]["depths"] == [0.0, 0.5, 1.0]
    for m in ("full", "quest", "asyncspade", "streaming"):
        r = res[m]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert set(r["by_context"]) == {"192", "320"} and len(r["by_depth"]) == 3
        assert sorted((c["context"], c["depth"]) for c in r["cells"]) == \
            sorted((c, d) for c in (192, 320) for d in (0.0, 0.5, 1.0))
        assert all(c["trials"] == 2 and len(c["outputs"]) == 2 for c in r["cells"])
        assert r["config"]["method"] == m
    # the same cases for every method; full agrees with itself
    assert [c["keys"] for c in res["full"]["cells"]] == [c["keys"] for c in res["streaming"]["cells"]]
    assert res["full"]["same_as_full"] == 1.0 and 0.0 <= res["quest"]["same_as_full"] <= 1.0
    assert png.stat().st_size > 1000 and "full" in stdout


# ----------------------------------------------------------------------------------------------------------- math
def _math(capsys, tiny_dir, data, out_dir, json_path, *extra):
    return main(capsys, "eval", "math", "--model", tiny_dir, "--dtype", "fp32", "--data", data, "--n-samples", "2",
                "--max-new-tokens", "10", "--max-batch", "3", "--methods", "full,asyncspade", "--out", out_dir,
                "--json", json_path, *SPARSE, *extra)


def _strip_timing(res: dict) -> dict:
    for k, v in res.items():
        if k != "settings":
            v.pop("tokens_per_s"), v.pop("tpot_ms")
    return res


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_math_resume_reproduces_an_uninterrupted_run(tiny_dir, tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(shared_data("gsm8k_test.jsonl").read_text().splitlines(keepends=True)[:3]))
    rc, _, err = _math(capsys, tiny_dir, data, tmp_path / "a", tmp_path / "a.json")
    assert rc == 0, err
    rc, _, err = _math(capsys, tiny_dir, data, tmp_path / "b", tmp_path / "b1.json", "--limit", "1")
    assert rc == 0, err
    first = _lines(tmp_path / "b" / "math-asyncspade.jsonl")
    assert [r["id"] for r in first] == ["0"]
    with open(tmp_path / "b" / "math-full.jsonl", "a") as f:       # a line cut by a crash is dropped
        f.write('{"id": "1", "samp')
    rc, _, err = _math(capsys, tiny_dir, data, tmp_path / "b", tmp_path / "b.json")
    assert rc == 0, err
    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a["full"]["problems"] == 3 and a["full"]["samples"] == 6
    assert _strip_timing(a) == _strip_timing(b)
    for m in ("full", "asyncspade"):
        la, lb = _lines(tmp_path / "a" / f"math-{m}.jsonl"), _lines(tmp_path / "b" / f"math-{m}.jsonl")
        assert [r["id"] for r in lb] == ["0", "1", "2"]
        strip = lambda rs: [{**r, "wall_s": 0, "samples": [{**s, "tpot_s": 0} for s in r["samples"]]}  # noqa: E731
                            for r in rs]
        assert strip(la) == strip(lb)
    assert _lines(tmp_path / "b" / "math-asyncspade.jsonl")[0] == first[0]     # the finished problem was kept
    # samples of a problem get distinct seeds, and the texts are not all the same
    rec = _lines(tmp_path / "a" / "math-full.jsonl")[0]
    assert len({s["seed"] for s in rec["samples"]}) == 2
    assert all(0 < s["tokens"] <= 10 for s in rec["samples"])


def test_math_refuses_an_out_dir_with_other_settings(tiny_dir, tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text(shared_data("gsm8k_test.jsonl").read_text().splitlines(keepends=True)[0])
    rc, _, err = _math(capsys, tiny_dir, data, tmp_path / "o", tmp_path / "o.json", "--limit", "1")
    assert rc == 0, err
    rc, _, err = _math(capsys, tiny_dir, data, tmp_path / "o", tmp_path / "o.json", "--temperature", "0.3")
    assert rc == 2 and "temperature" in err and "Traceback" not in err


def test_sample_seeds_are_stable_and_distinct():
    s = [math_eval.sample_seed(0, "gsm8k_test", "7", i) for i in range(4)]
    assert len(set(s)) == 4 and s == [math_eval.sample_seed(0, "gsm8k_test", "7", i) for i in range(4)]
    assert math_eval.sample_seed(1, "gsm8k_test", "7", 0) != s[0]


# ----------------------------------------------------------------------------------------------------------- report
def test_report_renders_every_kind(tmp_path, capsys):
    d = tmp_path / "res"
    d.mkdir()
    (d / "fidelity.json").write_text(json.dumps({"settings": {"data": "x.jsonl"}, "results": {
        "oracle@256": {"method": "oracle", "budget": 256, "top1_agreement": 0.9871, "kl_mean": 0.0123},
        "asyncspade@256": {"method": "asyncspade", "budget": 256, "top1_agreement": 0.9512, "kl_mean": 0.0345}}}))
    (d / "bench.json").write_text(json.dumps({"machine": {"cpu": "EPYC", "threads": 2}, "rows": [
        {"context": 4096, "batch": 1, "budget": 256, "method": "full", "tpot_s": 0.050, "late_rate": 0.0, "wait_s": 0},
        {"context": 4096, "batch": 1, "budget": 256, "method": "asyncspade", "tpot_s": 0.025, "late_rate": 0.1,
         "wait_s": 0.0005}]}))
    (d / "passkey.json").write_text(json.dumps({
        "settings": {"eval": "passkey", "contexts": [2048, 4096], "budget": 256},
        "full": {"accuracy": 0.75, "by_context": {"2048": 1.0, "4096": 0.5}, "by_depth": {"0.000": 0.5, "1.000": 1.0},
                 "cells": [], "config": {"method": "full", "budget": 256}},
        "quest": {"accuracy": 0.25, "by_context": {"2048": 0.5, "4096": 0.0}, "by_depth": {"0.000": 0.0, "1.000": 0.5},
                  "cells": [], "config": {"method": "quest", "budget": 256}}}))
    (d / "math.json").write_text(json.dumps({"settings": {"eval": "math", "n_samples": 4}, "full": {
        "problems": 10, "samples": 40, "pass@1": 0.125, "majority": 0.2, "mean_len": 301.5, "max_len": 512,
        "truncated": 0.25, "tokens_per_s": 40.0, "tpot_ms": 180.0}}))
    (d / "passkey.png").write_bytes(b"\x89PNG fake")
    (d / "sub").mkdir()
    (d / "sub" / "other.png").write_bytes(b"\x89PNG fake")
    (d / "notes.json").write_text("[1, 2]")
    rc, out, err = main(capsys, "eval", "report", d)
    assert rc == 0, err
    md = (d / "REPORT.md").read_text()
    for title in ("## Fidelity", "## Passkey", "## Math", "## Decode speed"):
        assert title in md
    assert "| asyncspade@256 | 0.9512 | 0.0345 |" in md
    assert "| full | - | 75.0% | - | 100.0% | 50.0% |" in md and "| quest | 256 | 25.0% | - | 50.0% | 0.0% |" in md
    assert "| full | 10 | 40 | 12.5% | 20.0% | 302 | 512 | 25.0% | 40.0 | 180.0 |" in md and "maj@4" in md
    # item 14: one meaning of "vs full", the same as the bench table's: the method's TPOT over full's, labelled
    assert "| context | batch | budget | method | TPOT ms | TPOT vs full |" in md
    assert "| 4096 | 1 | 256 | asyncspade | 25.00 | 0.50 | 0.1 | 0.50 |" in md and "below 1: faster" in md
    assert "![passkey.png](passkey.png)" in md and "(sub/other.png)" in md
    assert "`notes.json`" in md            # listed as not recognised


# ----------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, needle", [
    (["eval", "passkey", "--methods", "full,bogus"], "unknown method"),
    (["eval", "passkey", "--haystack", "/nonexistent/hay.txt"], "haystack file not found"),
    (["eval", "passkey", "--context", "2048,x"], "--context"),
    (["eval", "passkey", "--depths", "0"], "--depths"),
    (["eval", "math", "--methods", "nope"], "unknown method"),
    (["eval", "math", "--data", "/nonexistent/gsm.jsonl"], "data file not found"),
    (["eval", "math", "--n-samples", "0"], "--n-samples"),
    (["eval", "math", "--top-p", "0"], "top_p"),
    (["eval", "report", "/nonexistent/dir"], "not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    rc, _, err = main(capsys, *argv)
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_of_an_empty_dir_is_an_error(tmp_path, capsys):
    rc, _, err = main(capsys, "eval", "report", tmp_path)
    assert rc == 2 and "no fidelity, passkey, math or bench" in err


# ----------------------------------------------------------------------------------------------------------- data dir
GSM = ('{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", '
       '"answer": "3 + 4 = 7\\n#### 7"}\n')


def test_data_directory_does_not_depend_on_the_working_directory(tiny_dir, tmp_path, capsys, monkeypatch):
    """Item 15: the evals' default data is found from anywhere: --data-dir, else $ASYNCSPADE_DATA, else the
    repository default (they read ../shared/data relative to the working directory)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_test.jsonl").write_text(GSM)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    run = ["eval", "math", "--model", tiny_dir, "--dtype", "fp32", "--n-samples", "1", "--max-new-tokens", "4",
           "--methods", "full", "--json", tmp_path / "m.json"]
    monkeypatch.setenv("ASYNCSPADE_DATA", str(data))
    rc, _, err = main(capsys, *run)
    assert rc == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["full"]["problems"] == 1
    monkeypatch.setenv("ASYNCSPADE_DATA", str(tmp_path / "nowhere"))
    rc, _, err = main(capsys, *run, "--data-dir", data)              # the flag wins over the environment
    assert rc == 0, err
    rc, _, err = main(capsys, *run)
    assert rc == 2 and err.count("\n") == 1
    assert "gsm8k_test.jsonl" in err and "--data-dir" in err and "ASYNCSPADE_DATA" in err and "repository" in err
