"""Math task data: loading GSM8K / MATH-500 / AIME, answer extraction, checking, voting.

Everything here is model-free.  The schemas handled by :func:`load_problems`:

* GSM8K (``question``, ``answer`` whose last line is ``#### N``): gold is ``N`` with
  thousands separators removed; id is the 0-based line index.
* MATH-500 (``problem``, ``solution``, ``answer`` (LaTeX), ``unique_id``): id is ``unique_id``.
* AIME 2024 (``id``, ``problem``, ``solution``, ``answer`` as zero-padded string, e.g. ``"033"``).
* AIME 2025 (``id``, ``problem``, ``answer`` as int).

Generic rule: ``problem``/``question`` + ``answer`` is accepted; the id is ``id`` or
``unique_id`` when present, else the 0-based line index.  ``answer`` is stored verbatim as a
string (AIME ``"033"`` stays ``"033"``; :func:`is_correct` treats it as 33).

Answer checking uses ``math_verify``.  Its default timeouts use ``signal.alarm`` which only
works in the main thread; :func:`is_correct` uses the signal timeout in the main thread and
disables it elsewhere (it never raises either way).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..data import iter_jsonl

__all__ = [
    "Problem",
    "SYSTEM_PROMPT",
    "INSTRUCTION",
    "load_problems",
    "build_messages",
    "extract_answer",
    "is_correct",
    "answers_equivalent",
    "majority_vote",
]

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SYSTEM_PROMPT = None  # no system message: the instruction goes with the question (Qwen/DeepSeek style)

# math_verify timeouts (seconds) used in the main thread; elsewhere timeouts are disabled.
_PARSE_TIMEOUT = 5
_VERIFY_TIMEOUT = 5
# Answers longer than this skip math_verify (only the string fast path applies): sympy on long
# garbage (e.g. a degenerate "\\boxed{xxxx...}") takes seconds, and real answers are short
# (the longest MATH-500 gold answer is 53 characters).
MAX_VERIFY_CHARS = 300

# math_verify logs a warning when timeouts are disabled and on every parse timeout; quiet it.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    source: str


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def _gsm8k_gold(answer: str) -> str:
    gold = answer.rsplit("####", 1)[1].strip()
    return gold.replace(",", "")


def _record_to_problem(rec: dict, index: int, source: str, path: Path) -> Problem:
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: line {index + 1} is not a JSON object (got {type(rec).__name__})")
    keys = set(rec)
    question_key = "problem" if "problem" in keys else "question" if "question" in keys else None
    if question_key is None or "answer" not in keys:
        raise ValueError(
            f"{path}: unknown problem schema at line {index + 1}; saw keys {sorted(keys)}; "
            "expected GSM8K (question, answer with '#### N'), MATH-500 (problem, solution, "
            "answer, unique_id) or AIME (id, problem, answer)"
        )
    raw_answer = rec["answer"]
    if question_key == "question" and isinstance(raw_answer, str) and "####" in raw_answer:
        answer = _gsm8k_gold(raw_answer)  # GSM8K
    else:
        answer = str(raw_answer).strip()
    if "unique_id" in keys:
        pid = str(rec["unique_id"])
    elif "id" in keys:
        pid = str(rec["id"])
    else:
        pid = str(index)
    return Problem(id=pid, question=str(rec[question_key]), answer=answer, source=source)


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Load a JSONL math data set (schema detected per record, see module docstring).

    ``source`` of every problem is the file stem (e.g. ``"gsm8k_test"``, ``"aime24"``).
    ``limit`` keeps only the first ``limit`` records.  Raises ``ValueError`` naming the file
    and the keys seen for an unknown schema or invalid JSON.
    """
    path = Path(path)
    source = path.stem
    out: list[Problem] = []
    for line_no, rec in iter_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(_record_to_problem(rec, line_no - 1, source, path))
    return out


def build_messages(question: str) -> list[dict]:
    """Chat messages for one problem: a single user turn, question then the instruction."""
    return [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)
# a number not glued to a word (so signatures like "-sepehr2010" are not numbers)
_NUMBER_RE = re.compile(r"(?<![A-Za-z_\d.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?![A-Za-z_\d])")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces), in order.

    Also handles the brace-less form ``\\boxed 5``.  An unclosed brace is skipped.
    """
    found: list[str] = []
    for m in _BOXED_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                c = text[j]
                if c == "{" and text[j - 1] != "\\":
                    depth += 1
                elif c == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        found.append(text[i + 1 : j])
                        break
        elif i > m.end():  # "\boxed 5"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                found.append(tok.group(0))
    return found


def _clean(ans: str) -> str:
    ans = ans.strip()
    # strip surrounding $...$ / \( \) and trailing punctuation
    ans = re.sub(r"^\$+|\$+$", "", ans).strip()
    ans = re.sub(r"^\\\(|\\\)$", "", ans).strip()
    ans = ans.rstrip(" .;,").strip()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", ans):  # thousands separators
        ans = ans.replace(",", "")
    return ans


def extract_answer(text: str) -> str | None:
    """The model's final answer in ``text``, or None.

    Priority: last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces); else the last
    ``#### N``; else the last "answer is X" / "Answer: X"; else the last number in the text
    (thousands separators removed).  Returns None when nothing is found or ``text`` is empty.
    """
    if not text:
        return None
    boxed = [b for b in _boxed_contents(text) if b.strip()]
    if boxed:
        return boxed[-1].strip()
    hashes = _HASH_RE.findall(text)
    if hashes:
        ans = _clean(hashes[-1])
        if ans:
            return ans
    matches = list(_ANSWER_IS_RE.finditer(text))
    for m in reversed(matches):
        ans = _clean(re.split(r"\.(?:\s|$)", m.group(1))[0])
        if ans:
            return ans
    nums = _NUMBER_RE.findall(text)
    if nums:
        return nums[-1].replace(",", "")
    return None


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------

_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_INT_RE = re.compile(r"^[+-]?\d+$")


_FORMAT_RE = re.compile(r"^\\(?:textbf|mathbf|boxed|fbox|bf)\s*\{")


def _strip_wrapper(s: str) -> str | None:
    """``\\textbf{X}`` -> ``X`` if the wrapper's brace closes at the very end, else None."""
    m = _FORMAT_RE.match(s)
    if not m:
        return None
    depth = 0
    for j in range(m.end() - 1, len(s)):
        if s[j] == "{" and s[j - 1] != "\\":
            depth += 1
        elif s[j] == "}" and s[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return s[m.end() : j].strip() if j == len(s) - 1 else None
    return None


def _unwrap(ans: str) -> str:
    """Drop formatting: ``\\textbf{(073)}`` -> ``073``; ``\\boxed{x}`` -> ``x``; ``\\$`` and ``\\!``."""
    s = _clean(ans.replace("\\$", "").replace("\\!", ""))  # currency "\\$", thin space "\\!"
    while (inner := _strip_wrapper(s)) is not None:
        s = inner
    m = re.fullmatch(r"\(\s*([+-]?\d+(?:\.\d+)?)\s*\)", s)  # "(073)" (answer-choice style)
    if m:
        s = m.group(1)
    return s


def _normalize(ans: str) -> str:
    """Cheap canonical string form used for the fast equality path."""
    s = _unwrap(ans)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _INT_RE.match(s):
        s = str(int(s))
    elif re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _wrap(ans: str) -> list[str]:
    """Strings to feed to ``math_verify.parse`` for an already-extracted answer."""
    s = _unwrap(ans)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if "\\boxed" in s or "\\fbox" in s or re.search(r"(?<!\\)\$", s):
        return [s]
    if "\\" not in s:
        # plain-text math: make the common functions/constants LaTeX so they don't parse as
        # products of symbols (math_verify reads "pi" as p*i).
        s = re.sub(r"(?<![A-Za-z\\])pi(?![A-Za-z])", r"\\pi", s)
        s = re.sub(r"(?<![A-Za-z\\])sqrt\(([^()]*)\)", r"\\sqrt{\1}", s)
    return [f"\\boxed{{{s}}}", f"${s}$"]


@lru_cache(maxsize=4096)
def _parse_cached(ans: str, main: bool) -> tuple:
    from math_verify import parse
    from math_verify.errors import TimeoutException

    timeout = _PARSE_TIMEOUT if main else None
    for cand in _wrap(ans):
        try:
            res = parse(cand, parsing_timeout=timeout)
        except (Exception, TimeoutException):
            res = []
        if res:
            return tuple(res)
    return ()


def _verify(gold: str, pred: str) -> bool:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    main = _in_main_thread()
    g = _parse_cached(gold, main)
    p = _parse_cached(pred, main)
    if not g or not p:
        return False
    try:
        return bool(verify(list(g), list(p), timeout_seconds=_VERIFY_TIMEOUT if main else None))
    except (Exception, TimeoutException):
        return False


def is_correct(pred: str | None, gold: str) -> bool:
    """Whether the extracted answer ``pred`` equals ``gold`` (math-verify equivalence).

    ``pred`` and ``gold`` are bare answers (e.g. the output of :func:`extract_answer` and
    ``Problem.answer``); they may be LaTeX (``\\frac{14}{3}``), plain numbers, zero-padded
    ("033" == "33") or use thousands separators ("1,000" == "1000").  Never raises: any
    error or timeout inside math_verify counts as incorrect.  Answers longer than
    ``MAX_VERIFY_CHARS`` are only compared by normalized string.
    """
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        if not pred.strip() or not gold.strip():
            return False
        if _normalize(pred) == _normalize(gold):
            return True
        if len(pred) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
            return False
        return _verify(gold, pred)
    except BaseException as exc:  # noqa: BLE001 - must never raise (incl. math_verify TimeoutException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return False


def answers_equivalent(a: str | None, b: str | None) -> bool:
    """Symmetric equivalence of two answers (either direction of math-verify)."""
    if a is None or b is None:
        return False
    return is_correct(a, b) or is_correct(b, a)


def majority_vote(answers: list[str | None], gold: str | None = None) -> str | None:
    """Most common answer among ``answers`` up to mathematical equivalence.

    Grouping: answers are scanned in order; each joins the first existing group whose
    representative (its first member) is equivalent (normalized string equality fast path,
    else math-verify in either direction), otherwise it starts a new group.  If ``gold`` is
    given it is only an extra anchor: answers that are correct w.r.t. ``gold`` are all put in
    one group (so the vote is consistent with :func:`is_correct`); gold itself casts no vote.

    Winner: the largest group.  **Tie rule:** among equally large groups, the one whose first
    member appears earliest in ``answers`` wins.  The returned value is that first member.
    ``None`` answers never vote; the result is None only if every answer is None (or the list
    is empty).
    """
    groups: list[list[int]] = []  # indices into answers; groups[k][0] is the representative
    gold_group: list[int] | None = None
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        if gold is not None and is_correct(ans, gold):
            if gold_group is None:
                gold_group = [i]
                groups.append(gold_group)
            else:
                gold_group.append(i)
            continue
        for g in groups:
            if g is gold_group:
                continue  # not correct w.r.t. gold -> not in the gold group
            if answers_equivalent(answers[g[0]], ans):
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    best = max(groups, key=lambda g: (len(g), -g[0]))
    return answers[best[0]]
