"""``asyncspade eval fidelity``: window reading, the metrics, lockstep comparison with a dense reference, CLI."""
import json
import math

import pytest
import torch
from conftest import shared_data

from asyncspade import cli
from asyncspade.config import SparseConfig
from asyncspade.evals import fidelity
from asyncspade.evals.fidelity import Meter, Window, _score, compare, read_windows
from asyncspade.models import tiny_model

METHODS = ("oracle", "quest", "lastq", "asyncspade", "streaming")


pytestmark = pytest.mark.usefixtures("one_thread")      # tiny tensors: see conftest.one_thread


def windows(lengths, prefill, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Window(torch.randint(100, 5000, (n,), generator=g).tolist(), prefill) for n in lengths]


def configs(budget, **kw):
    base = dict(budget=budget, sink=4, recent=8, dense_layers=1, page_size=8) | kw
    return {f"{m}@{budget}": SparseConfig(method=m, **base) for m in METHODS}


# ------------------------------------------------------------------------------------------------ data
def test_text_windows_are_consecutive_cuts(tmp_path, tiny_llama):
    _, tok = tiny_llama
    path = tmp_path / "prose.txt"
    path.write_text("To be, or not to be, that is the question. " * 200)
    ws = read_windows(path, tok, 4096, max_tokens=50, prefill=20, windows=3)
    ids = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    assert [w.ids for w in ws] == [ids[0:50], ids[50:100], ids[100:150]]
    assert all(w.prefill == 20 for w in ws)
    with pytest.raises(cli.UserError, match="shorter than one window"):
        read_windows(path, tok, 4096, max_tokens=4000, prefill=20)
    with pytest.raises(cli.UserError, match="--prefill"):
        read_windows(path, tok, 4096, max_tokens=50, prefill=49)


def test_trace_windows_prefill_the_prompt(tmp_path, tiny_llama):
    _, tok = tiny_llama
    path = tmp_path / "traces.jsonl"
    recs = [{"prompt": f"Problem {i}: add 2 and 3. <think>\n", "output": "Okay, 2 plus 3 is 5. " * (5 + i)}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ws = read_windows(path, tok, 4096, limit=2)
    assert len(ws) == 2
    for w, r in zip(ws, recs):
        prompt = tok(r["prompt"])["input_ids"]
        assert w.prefill == len(prompt)
        assert w.ids == prompt + tok(r["output"], add_special_tokens=False)["input_ids"]
    capped = read_windows(path, tok, 4096, max_tokens=30, prefill=10)
    assert [len(w.ids) for w in capped] == [30, 30, 30] and capped[0].ids == ws[0].ids[:30]
    path.write_text('{"prompt": "no output"}\n')
    with pytest.raises(cli.UserError, match="line 1"):
        read_windows(path, tok, 4096)


# ------------------------------------------------------------------------------------------------ metrics
def test_score_metrics_by_hand():
    ws = [Window([1, 2, 3, 4, 5], 1), Window([9, 8, 7], 1)]
    dense = torch.tensor([[2.0, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    sparse = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    m = Meter(bin_width=2)
    # record 0 fed position 2 (true next token ids[3] = 4), record 1 fed position 2 (its last: no next token)
    _score(m, {0: (2, dense[0]), 1: (2, dense[1])}, {0: (2, sparse[0]), 1: (2, sparse[1])}, ws, budget=2)
    ld, ls = dense.log_softmax(-1), sparse.log_softmax(-1)
    kl = torch.nn.functional.kl_div(ls, ld, log_target=True, reduction="none").sum(-1)
    assert m.mean("kl") == pytest.approx(float(kl.mean()), rel=1e-5)
    assert m.mean("top1") == 0.5                       # record 0: argmax 0 vs 3; record 1: both 5
    assert m.n["nll"] == 1 and m.mean("nll") == pytest.approx(float(-ls[0, 4]))
    assert m.mean("nll_dense") == pytest.approx(float(-ld[0, 4]))
    m2 = Meter(bin_width=2)
    _score(m2, {0: (2, dense[0])}, {0: (2, sparse[0])}, ws, budget=3)     # cache of 3 tokens fits the budget
    assert m2.n["top1"] == 0
    with pytest.raises(RuntimeError, match="lockstep"):
        _score(m, {0: (2, dense[0])}, {1: (2, sparse[0])}, ws, budget=2)


def test_dense_layers_everywhere_match_dense_exactly(tiny_llama):
    """Every layer dense -> each engine computes what the reference does: pairs logits of the right record/step."""
    model, tok = tiny_llama
    ws = windows([70, 56, 80], prefill=20)
    res, _ = compare(model, tok, ws, configs(40, dense_layers=4), batch=2, progress=False)
    decoded_past_budget = sum(len(w.ids) - 40 for w in ws)        # steps whose cache (fed + 1) exceeds 40
    for r in res.values():
        assert r["steps"] == decoded_past_budget
        assert r["top1_agreement"] == 1.0 and r["kl_mean"] < 1e-6
        assert r["ppl"] == pytest.approx(r["ppl_dense"], rel=1e-5)
        assert r["attn_recall"] is None                            # no sparse layer, nothing probed


def test_budget_beyond_cache_counts_no_step(tiny_llama):
    model, tok = tiny_llama
    res, _ = compare(model, tok, windows([60, 50], prefill=40), configs(64), batch=2, progress=False)
    assert all(r["steps"] == 0 and r["kl_mean"] is None and r["top1_agreement"] is None for r in res.values())


def test_small_budget_oracle_covers_more_than_streaming(tiny_llama):
    model, tok = tiny_llama
    ws = windows([110, 90, 100], prefill=24, seed=1)
    # fewer candidates than the cache holds: the refined selection is not the oracle's by construction
    res, meters = compare(model, tok, ws, configs(40, superset=2, min_candidates=0), batch=2, bin_width=32,
                          progress=False)
    o, s = res["oracle@40"], res["streaming@40"]
    assert all(r["steps"] == sum(len(w.ids) - 40 for w in ws) for r in res.values())
    assert 0 < s["attn_recall"] < o["attn_recall"] < 1
    assert o["overlap"] == 1.0 and s["overlap"] < 0.9
    assert o["kl_mean"] < s["kl_mean"] and s["top1_agreement"] < 1
    for name in ("lastq@40", "asyncspade@40"):                    # ahead-of-time methods report their forecast
        assert 0 < res[name]["cosine"] <= 1 and 0 < res[name]["overlap"] < 1
    assert res["oracle@40"]["cosine"] is None and 0 < res["quest@40"]["overlap"] < 1
    x, y = meters["oracle@40"].curve("attn_recall")
    assert x == sorted(x) and len(x) >= 3 and all(0 < v <= 1 for v in y)


# ------------------------------------------------------------------------------------------------ CLI
def test_predictor_variants_become_configs():
    parser = cli.build_parser(["eval", "fidelity"])
    args = parser.parse_args(["eval", "fidelity", "--methods", "oracle,asyncspade", "--budgets", "128,256",
                              "--predictors", "ridge:mean,xlayer:2,hybrid", "--lead", "3"])
    cfgs = fidelity.configs_from_args(args)
    assert list(cfgs) == ["oracle@128", "asyncspade[ridge:mean]@128", "asyncspade[xlayer:2]@128",
                          "asyncspade[hybrid]@128", "oracle@256", "asyncspade[ridge:mean]@256",
                          "asyncspade[xlayer:2]@256", "asyncspade[hybrid]@256"]
    a = cfgs["asyncspade[ridge:mean]@256"]
    assert (a.predictor, a.ridge_kind, a.budget) == ("ridge", "mean", 256)
    assert (cfgs["asyncspade[xlayer:2]@128"].lead, cfgs["asyncspade[hybrid]@128"].lead) == (2, 3)
    for bad, msg in (("ridge:cubic", "ridge kind"), ("oracle", "unknown predictor"), ("xlayer:x", "lead")):
        with pytest.raises(cli.UserError, match=msg):
            fidelity.predictor_variants(bad)


def test_setting_variants_keep_the_default_beside_them():
    parser = cli.build_parser(["eval", "fidelity"])
    args = parser.parse_args(["eval", "fidelity", "--methods", "asyncspade", "--budgets", "128",
                              "--variants", "default,superset=2+min_candidates=0,refine=0"])
    cfgs = fidelity.configs_from_args(args)
    assert list(cfgs) == ["asyncspade[default]@128", "asyncspade[superset=2+min_candidates=0]@128",
                          "asyncspade[refine=0]@128"]
    # the settings as given (evals decode sparse from the budget on: min_sparse 0)
    assert cfgs["asyncspade[default]@128"] == SparseConfig(method="asyncspade", budget=128, min_sparse=0)
    assert (cfgs["asyncspade[superset=2+min_candidates=0]@128"].superset, cfgs["asyncspade[refine=0]@128"].refine) \
        == (2, False)
    with pytest.raises(cli.UserError, match="FIELD=VALUE"):
        fidelity.setting_variants("defaults")


def test_bad_data_path_exits_2(capsys, tmp_path):
    rc = cli.main(["eval", "fidelity", "--data", str(tmp_path / "missing.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "no such file" in err and "Traceback" not in err


def test_cli_writes_json_and_plot(tmp_path, capsys):
    model, tok = tiny_model("llama", num_layers=3)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "prose.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 60)
    out, png = tmp_path / "res" / "fid.json", tmp_path / "res" / "fid.png"
    rc = cli.main(["eval", "fidelity", "--model", str(tmp_path / "tiny"), "--dtype", "fp32", "--data", str(text),
                   "--max-tokens", "80", "--prefill", "30", "--windows", "2", "--budgets", "40,48",
                   "--methods", "oracle,asyncspade", "--sink", "4", "--recent", "8", "--dense-layers", "1",
                   "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"oracle@40", "asyncspade@40", "oracle@48", "asyncspade@48"}
    assert data["settings"]["windows"] == 2 and data["settings"]["budgets"] == [40, 48]
    keys = {"method", "budget", "top1_agreement", "kl_mean", "ppl", "ppl_dense", "attn_recall", "overlap", "cosine",
            "steps"}
    for name, r in data["results"].items():
        assert set(r) == keys and f"{r['method']}@{r['budget']}" == name
        assert r["steps"] == 2 * (80 - r["budget"]) and math.isfinite(r["kl_mean"])
    assert png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert table.count("\n| asyncspade |") == 2


@pytest.mark.slow
def test_bundled_model_on_a_real_trace():
    """The real model on the start of a real reasoning trace: the oracle beats the streaming baseline clearly."""
    from asyncspade.models import load_model
    path = shared_data("reasoning_traces.jsonl")
    model, tok = load_model(dtype=torch.float32)
    ws = read_windows(path, tok, model.config.max_position_embeddings, limit=1, max_tokens=300, prefill=200)
    cfgs = {m: SparseConfig(method=m, budget=128) for m in ("oracle", "streaming")}
    res, _ = compare(model, tok, ws, cfgs, progress=False)
    o, s = res["oracle"], res["streaming"]
    assert o["steps"] == s["steps"] == 100
    assert o["attn_recall"] > s["attn_recall"] + 0.05 and o["kl_mean"] < s["kl_mean"]
    assert o["top1_agreement"] > 0.9
