"""The demo a new user sees: a real long text shipped with the package, continued by full attention and asyncspade,
and a summary that says plainly which was faster and whether the texts agree."""
import re

from asyncspade import cli
from asyncspade.cli.demo import agreement, bundled_text, speed_verdict
from asyncspade.models import bundled_tokenizer


def test_the_bundled_text_is_real_and_long():
    """Item 16: without ../shared the demo decoded 6,000 random token ids."""
    text = bundled_text()
    assert text.startswith("The Constitution of the United States of America\n\nWe the People of the United States")
    assert "Amendment XXVII." in text and "\ufffd" not in text
    assert len(bundled_tokenizer()(text, add_special_tokens=False)["input_ids"]) > 8192   # fills the model's context


def test_the_summary_says_what_happened():
    assert speed_verdict(0.100, 0.050).startswith("asyncspade was faster: 2.00x")
    assert speed_verdict(0.050, 0.060).startswith("asyncspade was slower: 1.20x")
    assert "same speed" in speed_verdict(0.050, 0.0505)
    # both decoded densely: no speed claim from noise (the 6K demo printed "1.22x slower", then "1.10x faster")
    dense = speed_verdict(0.0066, 0.0080, dense_from=20000)
    assert dense.startswith("asyncspade decoded densely") and "past 20000 cached tokens" in dense
    assert "slower" not in dense and "faster" not in dense
    assert agreement([1, 2, 3], [1, 2, 3]) == "The two continuations are identical (3 tokens)."
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == \
        "The two continuations agree on the first 2 of 4 tokens, then differ."


def test_demo_runs_anywhere(tiny_dir, tmp_path, capsys, monkeypatch):
    """The demo needs no shared data and no particular working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASYNCSPADE_DATA", str(tmp_path / "nothing-here"))
    rc = cli.main(["demo", "--model", tiny_dir, "--context", "300", "--new-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "300 tokens of the Constitution of the United States" in err
    assert re.search(r"^asyncspade (was faster|was slower|and full attention decoded at the same speed|decoded densely)",
                     out, re.M)
    assert re.search(r"^The two continuations (are identical|agree on the first \d+ of 6 tokens)", out, re.M)
