"""``asyncspade bench`` end to end on a tiny checkpoint: every method's row, the byte floor beside it, and the
rates the cost model prices the sparse path with."""
import json

from asyncspade import cli


def test_bench_rows_carry_bytes_floor_and_rates(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", tiny_dir, "--contexts", "96", "--batches", "1,2", "--budgets", "48",
                   "--methods", "full,quest,asyncspade", "--page-size", "8", "--steps", "2", "--warmup", "1",
                   "--rounds", "1", "--fill", "64", "--roofline", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {(r["batch"], r["method"]): r for r in res["rows"]}
    # bench adds the zero-cost bound beside the sparse methods, at every batch
    assert set(rows) == {(b, m) for b in (1, 2) for m in ("full", "bound", "quest", "asyncspade")}
    for r in rows.values():
        assert r["tpot_s"] > 0 and r["bytes"] > 0 and r["floor_s"] == r["bytes"] / max(res["bandwidth"].values())
    # dense reads every cached row; the bound reads the budget's rows only; two sequences read more than one
    assert rows[(1, "bound")]["bytes"] < rows[(1, "full")]["bytes"] < rows[(2, "full")]["bytes"]
    assert 0 < res["rates"]["scattered"] <= res["rates"]["streamed"]
    printed = capsys.readouterr().out
    assert "scattered" in printed and "x floor" in printed
