"""Passkey retrieval prompts (LongLoRA / Quest protocol), model-free.

Layout of a case (plain text, no chat template)::

    <intro>\\n<haystack part 1><needle> <haystack part 2>\\nWhat is the pass key? The pass key is

* intro: "There is an important info hidden inside a lot of irrelevant text. Find it and
  memorize it. I will quiz you about the important information there."
* haystack: ``haystack_text[offset:]`` cut (at a token boundary) so that prefill + question
  is at most ``context_tokens`` tokens (it is repeated if too short).
* needle: "The pass key is {key}. Remember it. {key} is the pass key." inserted at the
  sentence boundary nearest to ``depth`` (0..1, measured in tokens over the haystack).
* question: "\\nWhat is the pass key? The pass key is" -> ``question_ids`` (tokenized on its
  own, to be fed token by token after the prefill).

Tokenization uses the given HF tokenizer without special tokens (no BOS is added; prepend it
yourself if your model needs one, and count it against ``context_tokens``).
"""

from __future__ import annotations

import random
import re
from bisect import bisect_left
from dataclasses import dataclass

__all__ = [
    "INTRO",
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "PasskeyCase",
    "make_passkey_prompt",
    "random_key",
    "check_passkey",
]

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
NEEDLE_TEMPLATE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyCase:
    prefill_ids: list[int]
    question_ids: list[int]
    key: str
    depth: float
    needle_token_pos: int

    @property
    def total_tokens(self) -> int:
        return len(self.prefill_ids) + len(self.question_ids)


def random_key(rng: random.Random) -> int:
    """A random 5-digit pass key (10000..99999)."""
    return rng.randint(10000, 99999)


def check_passkey(generated_text: str, key: str | int) -> bool:
    """True iff ``key`` occurs in ``generated_text`` as a whole number.

    "The pass key is 12345." matches key 12345; "123456", "012345" or "12345.6" do not.
    """
    key = str(key).strip()
    if not key or generated_text is None:
        return False
    pat = rf"(?<![\d.])(?<!\d,){re.escape(key)}(?!\d)(?!\.\d)(?!,\d)"
    return re.search(pat, generated_text) is not None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


# Sentence boundary = start of a line, or the position after ". ", "! ", "? " (incl. closing
# quotes/brackets). Position 0 and the end of the text are boundaries too.
_BOUNDARY_RE = re.compile(r"(?:\n|[.!?][\"')\]]*[ \t]+)")


def _sentence_boundaries(text: str) -> list[int]:
    pos = {0, len(text)}
    pos.update(m.end() for m in _BOUNDARY_RE.finditer(text))
    return sorted(pos)


def _haystack_source(haystack_text: str, offset: int, min_chars: int) -> str:
    if not haystack_text.strip():
        raise ValueError("haystack_text is empty")
    src = haystack_text[offset : offset + min_chars]
    while len(src) < min_chars:  # too short: repeat the haystack
        src = src + "\n" + haystack_text[: min_chars - len(src)]
    return src


def make_passkey_prompt(
    tokenizer,
    haystack_text: str,
    context_tokens: int,
    depth: float,
    key: int | str,
    offset: int = 0,
) -> PasskeyCase:
    """Build one passkey case of at most ``context_tokens`` tokens (prefill + question).

    ``depth`` in [0, 1] places the needle at the sentence boundary of the (cut) haystack
    nearest to that fraction of its tokens (0: right after the intro, 1: right before the
    question).  ``offset`` is a character offset into ``haystack_text`` where the haystack
    starts (use different offsets for different haystacks).  ``needle_token_pos`` is the
    index in ``prefill_ids`` of the first token of the needle.  The total is normally
    ``context_tokens`` or a token or two less (the haystack is cut at a token boundary and
    re-tokenized after the needle is inserted).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(key)
    needle = NEEDLE_TEMPLATE.format(key=key)
    question_ids = _encode(tokenizer, QUESTION)
    intro = INTRO + "\n"
    fixed = len(_encode(tokenizer, intro)) + len(_encode(tokenizer, needle + " "))
    budget = context_tokens - len(question_ids) - fixed
    if budget <= 0:
        raise ValueError(
            f"context_tokens={context_tokens} is too small for the intro, needle and question "
            f"({context_tokens - budget} tokens)"
        )

    # Tokenize enough haystack (about 10 chars/token is generous for English/BPE).
    src = _haystack_source(haystack_text, offset, min_chars=budget * 10 + 1000)
    hay_ids, hay_offsets = _encode_with_offsets(tokenizer, src)
    while len(hay_ids) < budget:  # very long tokens: take more text
        src = _haystack_source(haystack_text, offset, min_chars=2 * len(src))
        hay_ids, hay_offsets = _encode_with_offsets(tokenizer, src)

    n_hay = budget
    for _ in range(50):
        hay = src[: hay_offsets[n_hay - 1][1]] if n_hay > 0 else ""
        # needle position: nearest sentence boundary to depth * n_hay tokens
        target_tok = min(int(round(depth * n_hay)), n_hay)
        target_char = hay_offsets[target_tok][0] if target_tok < n_hay else len(hay)
        bounds = _sentence_boundaries(hay)
        i = bisect_left(bounds, target_char)
        cands = [bounds[j] for j in (i - 1, i) if 0 <= j < len(bounds)]
        cut = min(cands, key=lambda b: (abs(b - target_char), b))
        before, after = hay[:cut], hay[cut:]
        if before and not before[-1].isspace():
            before = before + " "
        if not after or after[0].isspace():
            sep_after = ""
        else:
            sep_after = "\n" if before.endswith("\n") or not before else " "
        prefix = intro + before
        prefill_text = prefix + needle + sep_after + after
        prefill_ids, offsets = _encode_with_offsets(tokenizer, prefill_text)
        total = len(prefill_ids) + len(question_ids)
        if total <= context_tokens:
            needle_char = len(prefix)
            needle_pos = next(
                (t for t, (s, e) in enumerate(offsets) if e > needle_char), len(prefill_ids)
            )
            return PasskeyCase(
                prefill_ids=prefill_ids,
                question_ids=question_ids,
                key=key,
                depth=float(depth),
                needle_token_pos=needle_pos,
            )
        n_hay -= total - context_tokens
        if n_hay < 0:
            break
    raise ValueError(f"could not fit a passkey case into {context_tokens} tokens")
