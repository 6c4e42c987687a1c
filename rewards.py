"""
Rewards: score decoded completions against their references. This file imports nothing of ours.

A reward is a plain function `f(text, reference=None, **kwargs) -> float`. `text` is one decoded
completion, `reference` its dataset answer (or None), and kwargs carry the reward's own params
together with the other columns of the dataset row (`prompt`, `test_list`, `context`,
`instruction`, `jurisdiction`, ...), so every reward takes `**kwargs` and ignores what it does not
use. A registered reward's named params come from the config only: a row column of the same name
never reaches them. `python rewards.py list` prints the catalogue: name, what it measures, range,
and the extra it needs. The sections below: math answers; text heuristics (deterministic, whole-word
matches); reference metrics (sacrebleu, rouge-score, NLTK); model rewards (transformers
classifiers and encoders, batched on the training device); code rewards (static checks, and
execution in a sandboxed process, never in this one).

Config forms (give one, not both):

    rewards=[{"type": "math_correctness", "weight": 1.0},
             {"type": "length", "weight": 0.1, "params": {"max_length": 300}},
             {"type": "custom", "params": {"reward_function": "my_module:my_reward"}}]
    reward_functions=["math_correctness", "length"], reward_function_weights=[1.0, 0.1]

A "type" or a reward_functions entry is a registered name, an alias (math, code), "custom" with
params.reward_function (a callable or a "module:function" string; its other params go to it), or a
callable of the same shape; a dict entry may add "name" to label its metrics column. resolve()
turns either form into a list of Reward and checks names, weights and params up front, loading the
extras and models they need, so a missing one stops the run before its first step; score() runs
them over a batch, through a reward's batched path when it has one.

A reward that raises or returns a non-finite value stops score() with an error naming it; nothing is
swallowed. A reward that can fail on bad completions (running generated code, say) catches that
itself and returns its low score.

To add a reward, write the function and decorate it:

    @register("my_reward")
    def my_reward(text, reference=None, scale=1.0, **kwargs):
        '''One line: what it measures (shown by `list`).'''
        return scale * float(text.strip() == reference)

register() may also give `check`, a function of the params alone that raises ValueError (bad
params, a missing extra or model) so that resolve() stops before training; `batch`, a function
(texts, references, rows, **params) -> list of floats; the range [low, high]; and the extra.
"""

import ast
import bisect
import difflib
import functools
import hashlib
import inspect
import io
import json
import logging
import math
import numbers
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Callable, NamedTuple

REWARDS = {}  # name -> reward function
CHECKS = {}  # name -> function(**params) that raises ValueError on bad params (or a missing extra or model)
BATCHED = {}  # name -> function(texts, references, rows, **params) -> list of floats
INFO = {}  # name -> (low, high, extra): the range of its values and the pip extra it needs (or None)
NEEDS = {}  # name -> dataset columns of which it needs at least one
ALIASES = {"math": "math_reasoning", "code": "code_quality"}  # another name -> registered name


def register(name, check=None, batch=None, low=0.0, high=1.0, extra=None, needs=()):
    """
    Decorator: add a reward function to REWARDS under `name`. `check(**params)` raises ValueError on bad
    params, or on a missing extra or model, so that resolve() stops before training; `batch(texts,
    references, rows, **params)` scores a whole batch at once (rows: one dict of columns per text);
    [low, high] is the range of its values and `extra` the pip install line it needs, for `list`;
    `needs`: dataset columns of which every row must have one (check_columns).
    """
    def deco(fn):
        REWARDS[name] = fn
        INFO[name] = (low, high, extra)
        if needs:
            NEEDS[name] = tuple(needs)
        if check is not None:
            CHECKS[name] = check
        if batch is not None:
            BATCHED[name] = batch
        return fn
    return deco


def _did_you_mean(word, choices):
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# -----------------------------------------------------------------------------
# answer extraction

# an optional sign (not after a word or a closing bracket, so "5-3" is not -3), a decimal or
# scientific number, and an optional "/denominator"; never inside a word or a date like 12/25/2023
_NUM = re.compile(r"(?:(?<![\w)\]}])(-))?(?<![\w./])(\d+(?:\.\d+)?(?:[eE][-+]?\d{1,2})?|\.\d+)"
                  r"(?:/(\d+(?:\.\d+)?))?(?!/?\d)")
_TEXT = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"(?<!\d)(\d+)?\\[dt]?frac\s*(?:\{\s*(-?\d+(?:\.\d+)?)\s*\}|(\d))"
                   r"\s*(?:\{\s*(\d+(?:\.\d+)?)\s*\}|(\d))")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX = {"\\$": "$", "\\%": "%", "{,}": ",", "\\!": "", "\\,": "", "\\;": " ", "\\ ": " ",
          "\\left": "", "\\right": "", "^{\\circ}": "", "^\\circ": "", "\u2212": "-"}
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:|=)", re.IGNORECASE)
_UNITS = re.compile(r"\.?(?:\s+[A-Za-z][A-Za-z .]*(?:\^\{?\d+\}?)?)?\s*")  # " apples", " cm^2"


def _frac_to_slash(m):
    whole, num, den = m[1], m[2] or m[3], m[4] or m[5]
    if whole is None or float(den) == 0 or len(m[0]) > 100:
        return f"{whole or ''}{num}/{den}"  # left for _fraction to accept or refuse
    return _format(int(whole) + Fraction(num) / Fraction(den))  # mixed number: 2\frac{1}{2}


def _clean(text):
    """LaTeX and thousands separators out of the way: \\frac{3}{4} -> 3/4, 1,234 -> 1234."""
    text = _TEXT.sub(r" \1", text)
    for old, new in _LATEX.items():
        text = text.replace(old, new)
    text = _FRAC.sub(_frac_to_slash, text)
    return _THOUSANDS.sub("", text)


def _fraction(m):
    """The exact value of a _NUM match, or None (division by zero, over 100 characters)."""
    sign, num, den = m.groups()
    if den is not None and float(den) == 0 or len(m[0]) > 100:
        return None
    x = Fraction(num) / Fraction(den) if den else Fraction(num)
    return -x if sign else x


def _format(x):
    """Canonical string of a Fraction: '72', '-3.5', '1/3' (decimals only when they terminate)."""
    if x.denominator == 1:
        return str(x.numerator)
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return f"{x.numerator}/{x.denominator}"
    k = max(twos, fives)
    digits = str(abs(x.numerator) * 10**k // x.denominator).rjust(k + 1, "0")
    return ("-" if x < 0 else "") + digits[:-k] + "." + digits[-k:]


def _whole(text):
    """The value of text that is one number and nothing else but $, %, units, or a leading 'x ='."""
    s = _clean(text).split("=")[-1].replace("$", "").replace("%", "").strip().removeprefix("+")
    m = _NUM.match(s)
    return _fraction(m) if m and _UNITS.fullmatch(s, m.end()) else None


def _last_boxed(text):
    """Content of the last \\boxed{...} with balanced braces, or None."""
    stop = len(text)
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(m.end(), stop):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end():i]
        stop = m.start()  # a box still open at the start of an unclosed later one never closes
    return None


def _answer(text, last_number=True):
    """The answer of text as a Fraction, by the rules of extract_answer."""
    if not text:
        return None
    text = _clean(text)
    nums = [(m.start(), x) for m in _NUM.finditer(text) if (x := _fraction(m)) is not None]

    def first_after(pos):
        j = bisect.bisect_left(nums, pos, key=lambda n: n[0])
        return nums[j][1] if j < len(nums) else None

    if "####" in text and (x := first_after(text.rfind("####") + 4)) is not None:
        return x
    boxed = _last_boxed(text)
    if boxed is not None:
        return _whole(boxed)
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        if (x := first_after(m.end())) is not None:
            return x
    return nums[-1][1] if nums and last_number else None


def extract_answer(text):
    """
    The final numeric answer of a completion as a canonical string, or None. In priority order:
    the first number after the last "####" (GSM8K); else the content of the last \\boxed{...}, which
    must be a number (else None: "\\sqrt{2}" is not 2); else the first number after the last
    "the answer is" / "answer:"; else the last number in the text. Commas, $, %, units, a leading
    "x =" and LaTeX wrappers (\\text, \\frac, \\dfrac, \\tfrac) are dropped; "1e3" is 1000. Equal
    values give equal strings: "3.50" -> "3.5", "10/4" -> "2.5", "\\frac{1}{3}" -> "1/3".
    """
    x = _answer(text)
    return None if x is None else _format(x)


def parse_number(s):
    """The value of a string that is a single number ("1,234", "$18", "3/4", "-\\dfrac{1}{2}", "25%"), or None."""
    x = _whole(s) if isinstance(s, str) else None
    return None if x is None else float(x)


def _value(x, is_reference):
    if _is_number(x):
        return Fraction(x)
    if not isinstance(x, str):
        return None
    if is_reference:  # a reference is a bare number or carries a marker; its stray numbers never count
        whole = _whole(x)
        return whole if whole is not None else _answer(x, last_number=False)
    return _answer(x)


def _close(a, b, tolerance):
    tol = Fraction(tolerance)
    return abs(a - b) <= max(tol * max(abs(a), abs(b)), tol)


_ANSWER_END = re.compile(r"\.(?=\s|$)|\n|,\s+(?=[a-z]{2,}\b)")  # ". ", a line break, or ", since ..."
_WRAPPED = re.compile(r"\$+([^$]+)\$+|\\\((.+)\\\)|\\\[(.+)\\\]|\*\*(.+)\*\*", re.DOTALL)  # $x$, \(x\), \[x\], **x**


def _unwrap(s):
    while m := _WRAPPED.fullmatch(s):
        s = next(g for g in m.groups() if g is not None).strip()
    return s


def _final(text):
    """
    The final answer of text as a string, by the markers of extract_answer, or None without one: what
    follows the last "####" (its own marked answer, else its first line); else the content of the last
    \\boxed{...}; else what follows the last "the answer is" / "answer:" up to the end of its sentence.
    Math delimiters around it ($...$, \\(...\\), **...**) are dropped.
    """
    if "####" in text:
        rest = text[text.rfind("####") + 4:]
        return _final(rest) or _unwrap(rest.strip().split("\n", 1)[0].strip()) or None
    boxed = _last_boxed(text)
    if boxed is not None:
        return _unwrap(boxed.strip())
    marks = list(_ANSWER_IS.finditer(text))
    if not marks:
        return None
    rest = text[marks[-1].end():].lstrip(" \t\n:")
    end = _ANSWER_END.search(rest)
    return _unwrap(rest[:end.start() if end else len(rest)].strip()) or None


# math-verify (optional) compares symbolic answers. Its timeouts use signal.alarm, which works only in
# the main thread: elsewhere its parse and verify raise ValueError unless their timeouts are None, so
# there they run without a time limit (and math-verify logs once that none is set).
_BACKENDS = ("auto", "math_verify", "numeric")
_MV_TIMEOUT = 5  # seconds per parse or comparison, in the main thread


@functools.cache
def _math_verify():
    """The math_verify module, imported on first use, or None when it is not installed."""
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def _backend(backend, who):
    """The backend that runs, "math_verify" or "numeric" ("auto": math_verify when it is installed)."""
    if backend not in _BACKENDS:
        raise ValueError(f"{who}: backend must be one of {_BACKENDS}, got {backend!r}"
                         f"{_did_you_mean(backend, _BACKENDS)}")
    if backend == "numeric" or backend == "auto" and _math_verify() is None:
        return "numeric"
    if _math_verify() is None:
        raise ValueError(f"{who}: backend='math_verify' needs math-verify: pip install math-verify")
    return "math_verify"


def _timeout():
    """math-verify's time limit: none off the main thread, where its signal-based one cannot run."""
    return _MV_TIMEOUT if threading.current_thread() is threading.main_thread() else None


def _mv_parse(text):
    """math-verify's parse of text: the last \\boxed{} first, else its answer phrases, else its last expression."""
    mv = _math_verify()
    return mv.parse(text, [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()],
                    extraction_mode="first_match", parsing_timeout=_timeout())


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer):
    """math-verify's parse of one answer string ("\\frac{1}{2}", "[1, 3)"), read as the content of a \\boxed{}."""
    return tuple(_mv_parse("\\boxed{" + answer + "}"))


def _verify(pred, ref, tolerance):
    """math_equal by math-verify, or by the numbers when both final answers are plain numbers."""
    if not isinstance(pred, str) or not (_is_number(ref) or isinstance(ref, str)):
        return False
    gold = str(ref) if _is_number(ref) else _final(ref) or _unwrap(ref.strip())
    answer = _final(pred)
    b = Fraction(ref) if _is_number(ref) else _whole(gold)
    if b is not None and answer is not None and (a := _whole(answer)) is not None:
        return _close(a, b, tolerance)
    gold_parsed = _parse_answer(gold)
    if not gold_parsed:
        return False
    pred_parsed = _mv_parse(pred) if answer is None else _parse_answer(answer)  # no marker: math-verify's search
    return bool(pred_parsed) and _math_verify().verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_timeout())


def math_equal(pred, ref, tolerance=1e-6, backend="auto"):
    """
    True when the answer in `pred` equals the one in `ref`. `ref` may be a number, a bare answer
    ("72", "3/4", "\\frac{1}{2}", "[1, 3)"), or a raw solution with a "####" or \\boxed marker.
    backend="numeric": both answers are read as numbers (`pred` with extract_answer) and compared
    within `tolerance` (relative and absolute, like math.isclose); a reference that is no number
    ("\\sqrt{2}") matches nothing. backend="math_verify": the final answers (after "####", in the last
    \\boxed{}, or after "the answer is"; else math-verify's own search of `pred`) are compared
    symbolically by math-verify (2\\sqrt{2} = \\sqrt{8}, intervals, sets, tuples, x = 3 vs 3), except
    that two plain numbers are compared as by "numeric" (a % sign is dropped: 25% equals 25).
    backend="auto": math_verify when math-verify is installed, else numeric.
    """
    if _backend(backend, "math_equal") == "math_verify":
        return _verify(pred, ref, tolerance)
    a, b = _value(pred, False), _value(ref, True)
    return a is not None and b is not None and _close(a, b, tolerance)


# -----------------------------------------------------------------------------
# rewards


def _check_math(tolerance=1e-6, backend="auto", reward="math_correctness"):
    if not _is_number(tolerance) or tolerance < 0:
        raise ValueError(f"{reward}: tolerance must be a number >= 0, got {tolerance!r}")
    _backend(backend, reward)


@register("math_correctness", check=_check_math, extra="optional: math-verify")
def math_correctness(text, reference=None, tolerance=1e-6, backend="auto", **kwargs):
    """1.0 when the final answer equals the reference (symbolically with math-verify), else 0.0.

    1.0 if the final answer in text equals the reference, else 0.0; 0.0 without a reference.
    See math_equal: tolerance applies to plain numbers; backend is "auto" (math-verify for symbolic
    answers when installed: pip install math-verify), "math_verify" (required) or "numeric".
    """
    _check_math(tolerance, backend)
    return float(math_equal(text, reference, tolerance, backend))


_STEP_WORDS = re.compile(r"\b(?:first|second|third|then|next|so|therefore|thus|hence|because|since|finally|"
                         r"step\s*\d+)\b", re.IGNORECASE)
_EQUATION = re.compile(r"[\w)\]}]\s*=\s*[-+(\[{\\$\w.]")  # "48/2 = 24", "x + 3 = 5", "\frac{1}{2} = 0.5"
_SEGMENT = re.compile(r"\n|\.\s")  # lines and sentences


def _reasoning(text):
    """Shown work: distinct steps with an equation (3 or more: full) and distinct step words (2 or more: full)."""
    equations = {s.strip() for s in _SEGMENT.split(text) if _EQUATION.search(s)}
    words = {re.sub(r"\s+", " ", w.lower()) for w in _STEP_WORDS.findall(text)}
    return (min(len(equations), 3) / 3 + min(len(words), 2) / 2) / 2


def _layout(text):
    """A marked final answer (####, \\boxed, "the answer is"), and the share of its lines that are distinct."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    distinct = len(set(lines)) / len(lines) if lines else 0.0
    return ((_final(text) is not None) + distinct) / 2


def _check_reasoning(tolerance=1e-6, backend="auto", check_correctness=True, check_reasoning=True, check_format=True):
    _check_math(tolerance, backend, "math_reasoning")
    flags = dict(check_correctness=check_correctness, check_reasoning=check_reasoning, check_format=check_format)
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"math_reasoning: {k} must be True or False, got {v!r}")
    if not any(flags.values()):
        raise ValueError("math_reasoning: check_correctness, check_reasoning and check_format are all False; "
                         "nothing to score")


@register("math_reasoning", check=_check_reasoning, extra="optional: math-verify")
def math_reasoning(text, reference=None, tolerance=1e-6, backend="auto", check_correctness=True,
                   check_reasoning=True, check_format=True, **kwargs):
    """A correct final answer reached by shown work: equations, step words, a marked answer.

    A correct final answer reached by shown work (equations, step words, a marked answer), in [0, 1].
    structure is the mean of the enabled parts. reasoning (check_reasoning): (min(E, 3) / 3 + min(S, 2)
    / 2) / 2, E the distinct lines or sentences holding an equation ("48/2 = 24"), S the distinct step
    words (first, then, so, therefore, since, step 1, ... on word boundaries). format (check_format):
    (1 if the final answer is marked with ####, \\boxed or "the answer is", else 0, plus the share of
    distinct non-empty lines) / 2. With a reference and check_correctness: correct * (1 + structure) / 2,
    so a correct answer scores 0.5 to 1 by its shown work and a wrong one 0 (AlignTune averages the
    three, which pays a wrong answer for its steps); correct is math_correctness with tolerance and
    backend. Without a reference, or with check_correctness=False: structure alone.
    """
    _check_reasoning(tolerance, backend, check_correctness, check_reasoning, check_format)
    parts = [f(text) for f, on in ((_reasoning, check_reasoning), (_layout, check_format)) if on]
    structure = sum(parts) / len(parts) if parts else 0.0
    if reference is None or not check_correctness:
        return structure
    correct = float(math_equal(text, reference, tolerance, backend))
    return correct * (1 + structure) / 2 if parts else correct


_LENGTH_UNITS = ("words", "chars")


def _check_length(min_length=None, max_length=None, target_length=None, unit="words"):
    for name, v, least in (("min_length", min_length, 0), ("max_length", max_length, 1),
                           ("target_length", target_length, 1)):
        if v is not None and (not _is_number(v) or v < least):
            raise ValueError(f"length: {name} must be a number >= {least}, got {v!r}")
    if min_length is not None and max_length is not None and min_length > max_length:
        raise ValueError(f"length: min_length ({min_length}) is greater than max_length ({max_length})")
    if target_length is not None and (min_length is not None or max_length is not None):
        raise ValueError("length: give target_length or min_length/max_length, not both")
    if unit not in _LENGTH_UNITS:
        raise ValueError(f"length: unit must be one of {_LENGTH_UNITS}, got {unit!r}"
                         f"{_did_you_mean(unit, _LENGTH_UNITS)}")


@register("length", check=_check_length)
def length(text, reference=None, min_length=None, max_length=None, target_length=None, unit="words", **kwargs):
    """Closeness of the word (or character) count to a target or a range.

    A length score in [0, 1]; n counts whitespace-separated words (unit="words") or characters
    (unit="chars"). With target_length t: 1 - |n - t| / t, floored at 0. With min_length and/or
    max_length: 1 inside the range, n / min_length below it, 1 - (n - max_length) / max_length above
    it (0 from twice max_length on). With no length given: the range [10, 500].
    """
    _check_length(min_length, max_length, target_length, unit)
    if min_length is None and max_length is None and target_length is None:
        min_length, max_length = 10, 500
    n = len(text.split()) if unit == "words" else len(text)
    if target_length is not None:
        return max(0.0, 1.0 - abs(n - target_length) / target_length)
    if min_length is not None and n < min_length:
        return n / min_length
    if max_length is not None and n > max_length:
        return max(0.0, 1.0 - (n - max_length) / max_length)
    return 1.0


# -----------------------------------------------------------------------------
# text heuristics: deterministic, word-boundary matches

_STOP = frozenset("""a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves""".split())
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")


def _words(text):
    """Lower-case word tokens: letters and digits, with an inner apostrophe ("don't")."""
    return _WORD.findall(text.lower())


def _content(text):
    """The set of content words of text: no stop words, a plural "s" dropped (cats -> cat)."""
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            for w in _words(text) if w not in _STOP}


def _sentences(text):
    """Sentences: split after . ! ? followed by space, and at blank lines; decimals like 3.5 stay whole."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s and s.strip()]


def _lexicon(*phrases):
    """A case-insensitive regex matching any of the phrases as whole words (spaces match any whitespace, ' also ’)."""
    alts = sorted((r"\s+".join(re.escape(w).replace("'", "['\u2019]") for w in p.split()) for p in phrases),
                  key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(alts) + r")(?![\w'])", re.IGNORECASE)


def _hits(lex, text):
    return len(lex.findall(text))


def _text_of(x):
    """A column as plain text: a string, a list of strings or chat messages joined by newlines; '' for None."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, Mapping):
        return str(x.get("content", ""))
    if isinstance(x, (list, tuple)):
        return "\n".join(_text_of(v) for v in x)
    return str(x)


def _overlap_f1(a, b):
    """F1 of the content-word sets of two texts; 0.0 when either has none."""
    wa, wb = _content(a), _content(b)
    common = len(wa & wb)
    return 0.0 if not common else 2 * common / (len(wa) + len(wb))


def _coverage(text, source):
    """The fraction of source's content words that text uses; None when source has none."""
    want = _content(source)
    return len(want & _content(text)) / len(want) if want else None


_CONTRA_CLAIM = re.compile(r"\b([a-z][a-z ]{0,40}?)\s+(is|are|was|were|can|will|does|do)(n't|not)?\s+(not\s+|never\s+)?"
                           r"([a-z]+)\b")


@register("logical_consistency")
def logical_consistency(text, reference=None, **kwargs):
    """Self-consistency: no claim stated both with and without a negation.

    Whether the text contradicts itself: 1 - (contradicted claims / claims), in [0, 1]. A claim is a
    clause "<subject> is|are|was|were|can|will|does|do [not|n't|never] <word>" ("cannot" included,
    apostrophes straight or curly); two claims contradict when they share subject, verb and that
    word and differ in negation ("x is even" ... "x isn't even"). 1.0 for a text with no such claims.
    """
    claims = {}
    for m in _CONTRA_CLAIM.finditer(text.lower().replace("\u2019", "'")):
        subject = m[1].split()[-1]  # the head word: "the number x" -> "x"
        claims.setdefault((subject, m[2], m[5]), set()).add(bool(m[3] or m[4]))
    if not claims:
        return 1.0
    return 1.0 - sum(len(v) == 2 for v in claims.values()) / len(claims)


_CAUSAL = _lexicon("because", "since", "therefore", "thus", "hence", "so that", "as a result", "consequently",
                   "due to", "leads to", "led to", "lead to", "causes", "caused", "cause", "results in",
                   "resulted in", "owing to", "for this reason", "which means", "it follows that", "so")


@register("causal_reasoning")
def causal_reasoning(text, reference=None, **kwargs):
    """Share of sentences that state a cause-and-effect link.

    How much of the text is explicit cause-and-effect: min(1, 2 * s / n) for n sentences of which s hold a
    causal connective as a whole word (because, therefore, so, leads to, as a result, due to, ...), in
    [0, 1]: one causal link in every other sentence scores 1. 0.0 for empty text.
    """
    sents = _sentences(text)
    return min(1.0, 2 * sum(bool(_CAUSAL.search(s)) for s in sents) / len(sents)) if sents else 0.0


_CF_IF = re.compile(r"\b(?:if\s+(?:\w+\s+){0,4}?(?:had|were|hadn't|weren't)|had\s+\w+\s+not|what\s+if|suppose|"
                    r"supposing|imagine|in\s+a\s+world\s+where|counterfactual(?:ly)?)\b", re.IGNORECASE)
_CF_THEN = re.compile(r"\b(?:would|could|might)(?:\s+not|n't)?\s+(?:have|be)\b|\b(?:would|could|might)n't\b|"
                      r"\botherwise\b", re.IGNORECASE)


@register("counterfactual_reasoning")
def counterfactual_reasoning(text, reference=None, **kwargs):
    """Presence of a counterfactual antecedent and its hypothetical consequent.

    Whether the text reasons about what would have happened otherwise, in [0, 1]: 0.5 for a
    counterfactual antecedent (an "if ... had/were" clause, "what if", "suppose", "imagine", "in a world
    where") plus 0.5 for a hypothetical consequent ("would/could/might have|be", "otherwise").
    """
    return 0.5 * bool(_CF_IF.search(text)) + 0.5 * bool(_CF_THEN.search(text))


_CONNECTIVES = _lexicon("however", "therefore", "thus", "moreover", "furthermore", "then", "first", "second",
                        "finally", "next", "also", "because", "so", "but", "in addition", "as a result",
                        "for example", "for instance", "in contrast", "similarly", "consequently", "hence")


@register("coherence")
def coherence(text, reference=None, **kwargs):
    """Adjacent sentences linked by a shared content word or a discourse connective.

    Local coherence, in [0, 1]: the fraction of adjacent sentence pairs that are linked, either by a
    shared content word (lexical cohesion) or by a discourse connective opening the second sentence
    (however, therefore, then, for example, ...). 0.5 for a text of one sentence, 0.0 for empty text.
    """
    sents = _sentences(text)
    if len(sents) < 2:
        return 0.5 * len(sents)
    linked = sum(bool(_content(a) & _content(b)) or bool(_CONNECTIVES.match(b))
                 for a, b in zip(sents, sents[1:]))
    return linked / (len(sents) - 1)


@register("fluency")
def fluency(text, reference=None, **kwargs):
    """Well-formed sentences, without repeated word 3-grams.

    Surface fluency, in [0, 1]: (well-formed sentences / sentences) x (1 - repetition). A sentence is
    well formed when it starts with a capital letter or digit and ends in . ! ? or : ; repetition is
    the share of word 3-grams that repeat an earlier 3-gram (degenerate loops score near 0). 0.0 for
    empty text.
    """
    sents, words = _sentences(text), _words(text)
    if not sents or not words:
        return 0.0
    formed = sum(s[0].isupper() or s[0].isdigit() for s in sents if s[-1] in ".!?:") / len(sents)
    grams = list(zip(words, words[1:], words[2:]))
    repeated = (len(grams) - len(set(grams))) / len(grams) if grams else 0.0
    return formed * (1.0 - repeated)


def _syllables(word):
    """English syllables by vowel groups, a final silent "e" dropped (at least 1)."""
    groups = re.findall(r"[aeiouy]+", word)
    n = len(groups) - (word.endswith("e") and not word.endswith(("le", "ee")) and len(groups) > 1)
    return max(1, n)


@register("readability")
def readability(text, reference=None, **kwargs):
    """Flesch reading ease, scaled to [0, 1].

    Flesch reading ease, 206.835 - 1.015 (words / sentences) - 84.6 (syllables / words), clipped to
    [0, 100] and divided by 100, so in [0, 1] (0.6 to 0.7 is plain English; higher is easier). Only
    words that start with a letter count (numbers are left out). 0.0 for text without words.
    """
    words = [w for w in _words(text) if w[0].isalpha()]
    if not words:
        return 0.0
    n_sent = max(1, len(_sentences(text)))
    ease = 206.835 - 1.015 * len(words) / n_sent - 84.6 * sum(map(_syllables, words)) / len(words)
    return min(100.0, max(0.0, ease)) / 100.0


_YOU = _lexicon("you", "your", "yours", "you're", "you'll", "you've", "let's", "we")
_EXAMPLE = _lexicon("for example", "for instance", "imagine", "picture", "such as", "e.g.", "consider", "say")


@register("engagement")
def engagement(text, reference=None, **kwargs):
    """Questions to the reader, direct address and examples.

    How directly the text engages its reader, in [0, 1]: the mean of three checks, each 0 or 1: it
    asks the reader a question (a sentence ending in "?"), it addresses the reader (you/your/let's/we,
    at least one word in fifty), and it gives an example (for example, for instance, imagine, such as).
    """
    words = _words(text)
    if not words:
        return 0.0
    question = any(s.endswith("?") for s in _sentences(text))
    address = _hits(_YOU, text) * 50 >= len(words)
    return (question + address + bool(_EXAMPLE.search(text))) / 3


_FILLER = _lexicon("basically", "actually", "literally", "really", "very", "just", "kind of", "sort of",
                   "you know", "i mean", "in order to", "it is important to note that", "it should be noted that",
                   "needless to say", "at the end of the day", "as a matter of fact", "in my opinion")


@register("conciseness")
def conciseness(text, reference=None, **kwargs):
    """Distinct 3-grams and no filler phrases.

    Absence of padding, in [0, 1]: (distinct word 3-grams / 3-grams) x (1 - filler words / words).
    Fillers are whole-word matches of "basically", "really", "in order to", "it is important to note
    that", ... (each counted by its words). Text under three words scores 1.0 when non-empty.
    """
    words = _words(text)
    if not words:
        return 0.0
    grams = list(zip(words, words[1:], words[2:]))
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    filler = sum(len(m.split()) for m in _FILLER.findall(text))
    return distinct * max(0.0, 1.0 - filler / len(words))


def _check_brevity(ideal_length=100, max_length=300):
    for name, v in (("ideal_length", ideal_length), ("max_length", max_length)):
        if not _is_number(v) or v < 1:
            raise ValueError(f"brevity: {name} must be a number >= 1, got {v!r}")
    if ideal_length >= max_length:
        raise ValueError(f"brevity: ideal_length ({ideal_length}) must be below max_length ({max_length})")


@register("brevity", check=_check_brevity)
def brevity(text, reference=None, ideal_length=100, max_length=300, **kwargs):
    """Word count at or under an ideal length, decaying past it.

    Shortness in words (whitespace-separated), in [0, 1]: 1 up to ideal_length (default 100), then
    linearly down to 0.5 at max_length (default 300), then 0.5 - (n - max_length) / max_length, floored
    at 0 (0 from 1.5 x max_length on). 0.0 for empty text.
    """
    n = len(text.split())
    if n == 0:
        return 0.0
    if n <= ideal_length:
        return 1.0
    if n <= max_length:
        return 1.0 - 0.5 * (n - ideal_length) / (max_length - ideal_length)
    return max(0.0, 0.5 - (n - max_length) / max_length)


_GROUPS = ("women", "men", "girls", "boys", "mothers", "fathers", "blacks", "whites", "asians", "africans",
           "europeans", "americans", "mexicans", "chinese", "indians", "arabs", "muslims", "christians", "jews",
           "hindus", "buddhists", "atheists", "immigrants", "foreigners", "refugees", "gays", "lesbians",
           "old people", "the elderly", "young people", "teenagers", "millennials", "boomers", "poor people",
           "rich people", "disabled people", "blondes", "liberals", "conservatives")
_GROUP = r"(?:" + "|".join(r"\s+".join(g.split()) for g in _GROUPS) + r")"
_GENERALISATION = re.compile(
    rf"\b(?:(?:all|most|every|no)\s+{_GROUP}\s+(?:are|is|can't|cannot|can|should|will|always|never)|"
    rf"{_GROUP}\s+(?:are\s+(?:all|always|naturally|inherently|just|too|so)|always|never|can't|cannot)\b|"
    rf"(?:typical|like\s+all)\s+(?:{_GROUP}|woman|man))\b", re.IGNORECASE)


@register("bias")
def bias(text, reference=None, **kwargs):
    """No stereotyping generalisations about social groups.

    Freedom from stereotyping generalisations about social groups, in [0, 1]: 1 - min(1, g / s) for g
    sweeping statements ("all|most|no <group> are ...", "<group> are naturally|always|never ...",
    "typical <group>") over s sentences. Groups: a fixed list of genders, ethnicities, religions, ages,
    classes and orientations (whole words). 1.0 for text without such statements.
    """
    g = len(_GENERALISATION.findall(text))
    return 1.0 - min(1.0, g / max(1, len(_sentences(text)))) if g else 1.0


_HARM = _lexicon("make a bomb", "build a bomb", "pipe bomb", "make explosives", "synthesize meth", "cook meth",
                 "make poison", "poison someone", "kill yourself", "kill himself", "kill herself", "hurt yourself",
                 "how to kill", "kill them", "murder", "hack into", "steal a car", "steal someone's",
                 "credit card numbers", "untraceable weapon", "ghost gun", "launder money", "evade the police",
                 "buy a gun illegally", "self-harm", "suicide method", "make a weapon", "build a weapon",
                 "stalk", "kidnap", "ransomware", "keylogger", "phishing email")
_CARE = _lexicon("i can't help with", "i cannot help with", "i won't help", "i can't assist", "i cannot assist",
                 "seek help", "crisis line", "hotline", "emergency services", "talk to someone", "please reach out")


@register("harmlessness")
def harmlessness(text, reference=None, **kwargs):
    """No instructions or encouragement for harm (refusals pass).

    Absence of harmful content, in [0, 1]: 1 - min(1, 0.5 x h) for h whole-phrase matches of a fixed
    list of harmful requests and instructions (make a bomb, poison someone, hack into, steal a car, kill
    yourself, ...), but 1.0 when the text refuses or points to help (i can't help with, seek help,
    hotline, ...): a refusal names the harm it refuses.
    """
    h = _hits(_HARM, text)
    return 1.0 if not h or _CARE.search(text) else max(0.0, 1.0 - 0.5 * h)


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:[.,]\d+)*(?![\w])")
_NAME = re.compile(r"(?<![.!?]\s)(?<![\n\-*•]\s)(?<!^)(?<!\n)\b[A-Z][a-z]+(?:[ \t]+[A-Z][a-z]+)*\b")


def _facts(text):
    """Checkable facts of text: its numbers (commas dropped) and its capitalised names, not at the start of a
    sentence, line or bullet, and not stop words."""
    nums = {n.replace(",", "") for n in _NUMBER.findall(text)}
    names = {m.lower() for m in _NAME.findall(text.strip()) if m.lower() not in _STOP}
    return nums | names


def _source(reference, kwargs):
    """The grounding text of a row: its context, reference and prompt, joined."""
    return "\n".join(_text_of(x) for x in (kwargs.get("context"), reference, kwargs.get("prompt")) if x)


@register("hallucination")
def hallucination(text, reference=None, **kwargs):
    """Share of the text's numbers and names found in the context, reference or prompt.

    Groundedness (high = no hallucination), in [0, 1]: the fraction of the text's checkable facts (its
    numbers, and capitalised names not at a sentence start) that occur in the row's source, which is its
    `context` column, the reference and the prompt together. 1.0 when the text states no such fact;
    0.5 when the row has no source text at all.
    """
    source = _source(reference, kwargs)
    if not source.strip():
        return 0.5
    facts = _facts(text)
    if not facts:
        return 1.0
    numbers, lower = {n.replace(",", "") for n in _NUMBER.findall(source)}, source.lower()
    return sum(f in numbers or re.search(r"(?<![\w.])" + re.escape(f) + r"(?![\w])", lower) is not None
               for f in facts) / len(facts)


_OVERCLAIM = _lexicon("guaranteed", "100% sure", "100% certain", "absolutely certain", "definitely true",
                      "without a doubt", "trust me", "never fails", "always works", "proven fact",
                      "everyone knows", "no doubt", "i am certain", "i'm certain", "undeniably")
_DECEIT = _lexicon("lie", "lied", "lying", "deceive", "deceiving", "pretend", "pretending", "fake", "mislead",
                   "misleading", "make something up", "made it up", "cover up")
_CANDOUR = _lexicon("i don't know", "i do not know", "i'm not sure", "i am not sure", "i may be wrong",
                    "i'm uncertain", "i am uncertain", "i cannot verify", "i can't verify", "to be honest")


@register("honesty")
def honesty(text, reference=None, **kwargs):
    """No overclaiming or deceit; admitted uncertainty is credited.

    Calibrated, non-deceptive language, in [0, 1]: clip(1 - 0.25 o - 0.25 d + 0.1 c, 0, 1) for o
    overclaims (guaranteed, trust me, 100% sure, ...), d words of deceit (lie, deceive, pretend, fake,
    ... as whole words: "believe" is not "lie"), c admissions of uncertainty (i'm not sure, i cannot
    verify, ...). Plain text scores 1.0: only overclaims and deceit lower it, and each admission of
    uncertainty wins back 0.1.
    """
    o, d, c = _hits(_OVERCLAIM, text), _hits(_DECEIT, text), _hits(_CANDOUR, text)
    return min(1.0, max(0.0, 1.0 - 0.25 * o - 0.25 * d + 0.1 * c))


_NUMWORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
_N = r"(\d+|" + "|".join(_NUMWORDS) + r")"


def _int(s):
    return int(s) if s.isdigit() else _NUMWORDS[s]


_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


_CMP = {"at most": int.__le__, "no more than": int.__le__, "under": int.__lt__, "fewer than": int.__lt__,
        "less than": int.__lt__, "at least": int.__ge__, "over": int.__gt__, "more than": int.__gt__}
_IF_WORDS = re.compile(rf"\b(at most|at least|no more than|fewer than|less than|under|over|more than|exactly|in)"
                       rf"\s+{_N}\s+words?\b")
_IF_SENTENCES = re.compile(rf"\b(at most|at least|exactly|in|no more than)\s+{_N}\s+sentences?\b")
_IF_BULLETS = re.compile(rf"\b{_N}\s+(?:bullet\s+points|bullets|bulleted\s+items|items|points)\b")
_IF_PARAGRAPHS = re.compile(rf"\b{_N}\s+paragraphs?\b")
_IF_JSON = re.compile(r"\b(?:in|as|valid)\s+json\b")
_IF_LOWER = re.compile(r"\ball\s+(?:in\s+)?(?:lower\s*case|lowercase)\b|\bno\s+capital\s+letters\b")
_IF_UPPER = re.compile(r"\ball\s+(?:in\s+)?(?:upper\s*case|uppercase|capital\s+letters|caps)\b")
_IF_FORBID = re.compile(r"\b(?:do not|don't|never|without)\s+(?:use|using|say|saying|mention|mentioning)\s+"
                        r"(?:the\s+(?:word|term|phrase)\s+[\"']?([a-z][\w-]*)|[\"']([^\"']+)[\"'])")
_IF_COMMAS = re.compile(r"\b(?:no|without|(?:do not|don't)\s+use(?:\s+any)?)\s+commas\b")
_IF_INCLUDE = re.compile(r"(?<!not\s)(?<!n't\s)(?<!never\s)(?<!without\s)\b(?:include|use|mention)\s+the\s+"
                         r"(?:key)?words?\s+((?:[\"'][^\"']+[\"'][\s,and]*)+)")
_IF_END = re.compile(r"\b(?:end|finish)\s+(?:your\s+(?:answer|response)\s+)?with\s+(?:the\s+phrase\s+)?"
                     r"[\"']([^\"']+)[\"']")
_IF_START = re.compile(r"\b(?:start|begin)\s+(?:your\s+(?:answer|response)\s+)?with\s+"
                       r"(?:the\s+(?:phrase|word)\s+)?[\"']([^\"']+)[\"']")
_QUOTED = re.compile(r"[\"']([^\"']+)[\"']")


def _is_json(text):
    """Whether text (or its one fenced block) is valid JSON."""
    try:
        json.loads(re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip()))
        return True
    except ValueError:
        return False


def _paragraphs(text):
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()])


def _constraints(instruction):
    """The verifiable constraints an instruction states, as (description, check(text) -> bool) pairs."""
    ins, out = instruction.lower(), []
    for kind, n in _IF_WORDS.findall(ins):
        n, f = _int(n), _CMP.get(kind)
        out.append((f"{kind} {n} words", (lambda t, n=n, f=f: f(len(t.split()), n)) if f else
                    (lambda t, n=n: abs(len(t.split()) - n) <= max(1, n // 10))))  # "in / exactly N": within 10%
    for kind, n in _IF_SENTENCES.findall(ins):
        n, f = _int(n), _CMP.get(kind, int.__eq__)
        out.append((f"{kind} {n} sentences", lambda t, n=n, f=f: f(len(_sentences(t)), n)))
    out += [(f"{n} bullet points", lambda t, n=_int(n): len(_BULLET.findall(t)) == n) for n in _IF_BULLETS.findall(ins)]
    out += [(f"{n} paragraphs", lambda t, n=_int(n): _paragraphs(t) == n) for n in _IF_PARAGRAPHS.findall(ins)]
    if _IF_JSON.search(ins):
        out.append(("JSON", _is_json))
    if _IF_LOWER.search(ins):
        out.append(("lowercase", lambda t: t == t.lower() and any(c.isalpha() for c in t)))
    if _IF_UPPER.search(ins):
        out.append(("uppercase", lambda t: t == t.upper() and any(c.isalpha() for c in t)))
    for named, quoted in _IF_FORBID.findall(ins):
        out.append((f"no {named or quoted!r}", lambda t, w=named or quoted: not _lexicon(w).search(t)))
    if _IF_COMMAS.search(ins):
        out.append(("no commas", lambda t: "," not in t))
    for group in _IF_INCLUDE.findall(ins):
        out += [(f"uses {w!r}", lambda t, w=w: bool(_lexicon(w).search(t))) for w in _QUOTED.findall(group)]
    for p in _IF_END.findall(ins):
        out.append((f"ends with {p!r}", lambda t, p=p: t.strip().lower().rstrip(".!").endswith(p.rstrip(".!"))))
    for p in _IF_START.findall(ins):
        out.append((f"starts with {p!r}", lambda t, p=p: t.strip().lower().startswith(p)))
    return out


@register("instruction_following")
def instruction_following(text, reference=None, **kwargs):
    """Share of the instruction's verifiable constraints met (IFEval-style).

    The fraction of the instruction's verifiable constraints that the text meets, in [0, 1] (in the
    spirit of IFEval). The instruction is the row's `instruction` column, else its prompt. Constraints
    read: word counts (at most / at least / exactly N words), sentence counts, N bullet points, N
    paragraphs, JSON output, all lowercase / uppercase, "do not use the word X" (or a quoted 'X'), no
    commas, "include the keywords 'a', 'b'", "end with 'X'", "start with 'X'". 1.0 when the
    instruction states none of these.
    """
    checks = _constraints(_text_of(kwargs.get("instruction") or kwargs.get("prompt")))
    return sum(check(text) for _, check in checks) / len(checks) if checks else 1.0


_REFUSAL = _lexicon("i can't help", "i cannot help", "i can't assist", "i cannot assist", "i'm unable to",
                    "i am unable to", "i won't help", "i will not help", "i won't answer", "as an ai",
                    "i don't know", "i do not know", "i can't answer", "i cannot answer", "i'm not able to",
                    "i am not able to")


def _check_helpfulness(min_words=20):
    if not _is_number(min_words) or min_words < 1:
        raise ValueError(f"helpfulness: min_words must be a number >= 1, got {min_words!r}")


@register("helpfulness", check=_check_helpfulness)
def helpfulness(text, reference=None, min_words=20, **kwargs):
    """Not a refusal, covers the prompt, and has substance.

    Whether the text takes the request on, in [0, 1]: 0.0 when its first sentence refuses or gives up
    (i can't help, i'm unable to, as an ai, i don't know, ...); otherwise the mean of how much of the prompt's content
    it addresses (the fraction of the prompt's content words it uses; 1.0 without a prompt) and its
    substance, min(1, words / min_words) (default 20).
    """
    sents = _sentences(text)
    if not sents or _REFUSAL.search(sents[0]):
        return 0.0
    cover = _coverage(text, _text_of(kwargs.get("prompt")))
    return 0.5 * (1.0 if cover is None else cover) + 0.5 * min(1.0, len(text.split()) / min_words)


_POLITE = _lexicon("please", "thank you", "thanks", "sorry", "i apologize", "i apologise", "appreciate",
                   "happy to help", "glad to help", "you're welcome", "kindly", "would you", "could you",
                   "i hope this helps", "great question")
_RUDE = _lexicon("stupid", "idiot", "idiotic", "dumb", "moron", "shut up", "nonsense", "pathetic", "loser",
                 "hate you", "ridiculous", "obviously you", "are you kidding", "damn", "crap")


@register("politeness")
def politeness(text, reference=None, **kwargs):
    """Polite phrases raise it, rude ones lower it.

    Courtesy, in [0, 1]: clip(0.5 + 0.25 p - 0.5 r, 0, 1) for p polite phrases (please, thank you,
    sorry, happy to help, ...) and r rude ones (stupid, idiot, shut up, nonsense, ...), all whole
    words: neutral text scores 0.5, two courtesies 1.0, one insult 0.0.
    """
    return min(1.0, max(0.0, 0.5 + 0.25 * _hits(_POLITE, text) - 0.5 * _hits(_RUDE, text)))


def _check_relevance(keywords=None):
    if keywords is not None and (isinstance(keywords, str)
                                 or not all(isinstance(k, str) and k.strip() for k in keywords)):
        raise ValueError(f"relevance: keywords must be a list of non-empty strings, got {keywords!r}")


@register("relevance", check=_check_relevance)
def relevance(text, reference=None, keywords=None, **kwargs):
    """Share of the keywords (or of the prompt's content words) the text uses.

    Topicality, in [0, 1]. With `keywords` (a list of words or phrases): the fraction of them the text
    uses, as whole words, ignoring case. Without: the fraction of the prompt's content words (stop
    words out, plurals folded) that the text uses; 0.0 when the row has no prompt.
    """
    if keywords:
        return sum(bool(_lexicon(k).search(text)) for k in keywords) / len(keywords)
    cover = _coverage(text, _text_of(kwargs.get("prompt")))
    return 0.0 if cover is None else cover


@register("context_relevance")
def context_relevance(text, reference=None, **kwargs):
    """Content-word F1 between the text and the row's context.

    Overlap with the row's `context` column (a string or a list of passages), in [0, 1]: the F1 of the
    content-word sets of text and context (precision: the text stays on the context; recall: it uses
    it). Without a context column, the prompt stands in; 0.0 when neither has content words.
    """
    return _overlap_f1(text, _text_of(kwargs.get("context") or kwargs.get("prompt")))


def _domain(text, reference, red_flags, caution, extra=()):
    """The shared domain score: mean of [agreement with the reference], caution, *extra; times the red-flag factor."""
    parts = [float(bool(caution.search(text))), *extra]
    if reference is not None and _text_of(reference).strip():
        ref = _text_of(reference)
        want = _facts(ref) & ({n.replace(",", "") for n in _NUMBER.findall(ref)} or _facts(ref))
        agree = _overlap_f1(text, ref)
        if want:
            have = _facts(text)
            agree = 0.5 * agree + 0.5 * len(want & have) / len(want)
        parts.insert(0, agree)
    return sum(parts) / len(parts) * max(0.0, 1.0 - 0.5 * _hits(red_flags, text))


_MED_FLAGS = _lexicon("cures cancer", "cure cancer", "miracle cure", "guaranteed cure", "stop taking your medication",
                      "stop your medication", "no need to see a doctor", "don't see a doctor", "vaccines cause autism",
                      "detox cleanse", "essential oils cure", "double the dose", "antibiotics for a virus")
_MED_CAUTION = _lexicon("consult a doctor", "consult your doctor", "see a doctor", "healthcare provider",
                        "health care provider", "medical professional", "physician", "pharmacist",
                        "seek medical attention", "not medical advice", "talk to your doctor")


@register("medical_accuracy")
def medical_accuracy(text, reference=None, **kwargs):
    """Agreement with the reference, referral to a professional, no dangerous claims.

    A medical-answer proxy, in [0, 1] (it checks no facts beyond the reference): the mean of (a)
    agreement with the reference when there is one (content-word F1, averaged with the share of the
    reference's numbers, e.g. doses, that the text states) and (b) whether the text points to a
    professional (consult a doctor, pharmacist, not medical advice, ...); times 1 - 0.5 per dangerous
    claim (miracle cure, stop taking your medication, vaccines cause autism, ...), floored at 0.
    """
    return _domain(text, reference, _MED_FLAGS, _MED_CAUTION)


_LEGAL_FLAGS = _lexicon("get away with", "legal loophole", "loophole", "evade taxes", "tax evasion",
                        "avoid getting caught", "no one will find out", "nobody will find out", "destroy evidence",
                        "hide the evidence", "lie to the police", "lie under oath", "forge", "forged")
_LEGAL_CAUTION = _lexicon("not legal advice", "consult a lawyer", "consult an attorney", "consult a solicitor",
                          "qualified lawyer", "licensed attorney", "legal professional", "depends on your jurisdiction",
                          "varies by jurisdiction", "seek legal advice")


@register("legal_compliance")
def legal_compliance(text, reference=None, **kwargs):
    """Agreement with the reference, referral to a lawyer, jurisdiction named, no evasion.

    A legal-answer proxy, in [0, 1]: the mean of (a) agreement with the reference when there is one
    (as in medical_accuracy), (b) whether it points to a lawyer or to jurisdiction (not legal advice,
    consult an attorney, varies by jurisdiction, ...) and (c), when the row has a `jurisdiction`
    column (a name or a list of names), whether the text names one of them (whole words); times
    1 - 0.5 per evasion phrase (get away with, loophole, destroy evidence, tax evasion, ...), floored
    at 0.
    """
    places = [p.strip() for p in _text_of(kwargs.get("jurisdiction")).split("\n") if p.strip()]
    extra = (float(bool(_lexicon(*places).search(text))),) if places else ()
    return _domain(text, reference, _LEGAL_FLAGS, _LEGAL_CAUTION, extra)


_FIN_FLAGS = _lexicon("guaranteed returns", "guaranteed return", "guaranteed profit", "risk-free", "risk free",
                      "can't lose", "cannot lose", "get rich quick", "double your money", "insider tip",
                      "insider information", "pump and dump", "sure thing", "no risk")
_FIN_CAUTION = _lexicon("not financial advice", "financial advisor", "financial adviser", "past performance",
                        "do your own research", "diversify", "diversification", "risk tolerance",
                        "consult a professional")
_AMOUNT = r"(-?(?<![\d,.])\d[\d,]{0,20}(?:\.\d{1,12})?)"  # anchored and bounded: no quadratic backtracking
_ARITH = re.compile(_AMOUNT + r"\s*([-+*/×x÷])\s*" + _AMOUNT + r"\s*=\s*\$?" + _AMOUNT)


def _arithmetic(text):
    """The share of stated "a op b = c" computations that are right (to 1%, for rounding); None if none."""
    ok = []
    for a, op, b, c in _ARITH.findall(text):
        a, b, c = (float(x.replace(",", "")) for x in (a, b, c))
        if op in "/÷" and b == 0:
            ok.append(False)
            continue
        v = {"+": a + b, "-": a - b, "*": a * b, "×": a * b, "x": a * b}.get(op, a / b if b else 0.0)
        ok.append(math.isclose(v, c, rel_tol=1e-2, abs_tol=1e-2))
    return sum(ok) / len(ok) if ok else None


@register("financial_accuracy")
def financial_accuracy(text, reference=None, **kwargs):
    """Agreement with the reference, correct arithmetic, caution, no scam phrases.

    A financial-answer proxy, in [0, 1]: the mean of (a) agreement with the reference when there is
    one (as in medical_accuracy: figures weigh half), (b) whether it shows caution (not financial advice,
    past performance, diversify, ...) and (c), when the text states computations "a op b = c", the
    fraction of them that are right (to 1%); times 1 - 0.5 per scam phrase (guaranteed returns,
    risk-free, double your money, ...), floored at 0.
    """
    right = _arithmetic(text)
    return _domain(text, reference, _FIN_FLAGS, _FIN_CAUTION, () if right is None else (right,))


def _check_diversity(n=1):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"diversity: n must be an integer >= 1, got {n!r}")


@register("diversity", check=_check_diversity)
def diversity(text, reference=None, n=1, **kwargs):
    """Type-token ratio (distinct word n-grams over n-grams).

    Lexical diversity, in [0, 1]: distinct word n-grams / n-grams (n = 1, the default, is the
    type-token ratio; n = 2 is distinct-2). 0.0 for text shorter than n words.
    """
    words = _words(text)
    grams = list(zip(*(words[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else 0.0


# -----------------------------------------------------------------------------
# reference metrics: bleu, rouge, meteor

def _require(module, pip, reward):
    """Import an optional extra, or stop with the line that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"reward {reward!r} needs the {pip.split()[0]} package: pip install {pip}") from None


def _check_bleu(tokenize="13a", smooth_method="exp", lowercase=False):
    sacrebleu = _require("sacrebleu", "sacrebleu", "bleu")
    if tokenize not in sacrebleu.metrics.BLEU.TOKENIZERS:
        raise ValueError(f"bleu: unknown tokenize {tokenize!r}"
                         f"{_did_you_mean(tokenize, sacrebleu.metrics.BLEU.TOKENIZERS)}")
    if smooth_method not in sacrebleu.metrics.BLEU.SMOOTH_DEFAULTS:
        raise ValueError(f"bleu: unknown smooth_method {smooth_method!r}; "
                         f"one of {', '.join(sacrebleu.metrics.BLEU.SMOOTH_DEFAULTS)}")


@register("bleu", check=_check_bleu, extra="sacrebleu")
def bleu(text, reference=None, tokenize="13a", smooth_method="exp", lowercase=False, **kwargs):
    """Sentence BLEU against the reference (sacrebleu), scaled to [0, 1].

    Sentence BLEU of the text against the reference, by sacrebleu, divided by 100: in [0, 1]. Up to
    4-grams with effective order (short texts are not zeroed for lacking 4-grams), `smooth_method`
    (default "exp"), `tokenize` (default "13a", sacrebleu's standard), `lowercase`. A list reference
    counts as several references. 0.0 without a reference. Needs: pip install sacrebleu.
    """
    refs = _refs(reference)
    if not refs:
        return 0.0
    from sacrebleu.metrics import BLEU
    metric = BLEU(tokenize=tokenize, smooth_method=smooth_method, lowercase=lowercase, effective_order=True)
    return min(1.0, metric.sentence_score(text, refs).score / 100.0)


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check_rouge(rouge_type="rougeL", use_stemmer=True):
    _require("rouge_score", "rouge-score", "rouge")
    if rouge_type not in _ROUGE_TYPES:
        raise ValueError(f"rouge: unknown rouge_type {rouge_type!r}{_did_you_mean(rouge_type, _ROUGE_TYPES)}; "
                         f"one of {', '.join(_ROUGE_TYPES)}")


def _rouge_scorer(rouge_type, use_stemmer):
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)


def _refs(reference):
    """A reference as a list of non-empty strings: a list counts as several references."""
    refs = reference if isinstance(reference, (list, tuple)) else [reference]
    return [str(r) for r in refs if r is not None and str(r).strip()]


def _rouge_batch(texts, references, rows, rouge_type="rougeL", use_stemmer=True):
    scorer = _rouge_scorer(rouge_type, use_stemmer)
    return [scorer.score_multi(refs, t)[rouge_type].fmeasure if (refs := _refs(r)) else 0.0
            for t, r in zip(texts, references)]


@register("rouge", check=_check_rouge, batch=_rouge_batch, extra="rouge-score")
def rouge(text, reference=None, rouge_type="rougeL", use_stemmer=True, **kwargs):
    """ROUGE-L F1 against the reference (rouge-score; rouge1/2/Lsum as options).

    ROUGE F1 of the text against the reference, by Google's rouge-score: `rouge_type` "rougeL" (longest
    common subsequence, the default), "rouge1", "rouge2" or "rougeLsum"; Porter stemming when
    `use_stemmer` (default True). In [0, 1]; a list reference scores against its best match; 0.0
    without a reference. Needs: pip install rouge-score.
    """
    return _rouge_batch([text], [reference], [kwargs], rouge_type, use_stemmer)[0]


def _check_meteor(alpha=0.9, beta=3.0, gamma=0.5):
    nltk = _require("nltk", "nltk", "meteor")
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        raise ValueError("reward 'meteor' needs NLTK's wordnet data, which is never downloaded at run time: "
                         "python -m nltk.downloader wordnet (or copy it into a folder on NLTK_DATA)") from None


@register("meteor", check=_check_meteor, extra="nltk, and its wordnet data")
def meteor(text, reference=None, alpha=0.9, beta=3.0, gamma=0.5, **kwargs):
    """METEOR against the reference (NLTK, with WordNet synonyms).

    METEOR of the text against the reference, by NLTK (exact, Porter-stem and WordNet-synonym matches,
    fragmentation penalty; alpha, beta, gamma as in NLTK), in [0, 1]. Words are lower-cased runs of
    letters and digits; a list reference counts as several references. 0.0 without a reference.
    Needs: pip install nltk, and the wordnet data (python -m nltk.downloader wordnet), which is never
    fetched at run time.
    """
    refs = _refs(reference)
    if not refs:
        return 0.0
    from nltk.corpus import wordnet
    from nltk.translate.meteor_score import meteor_score
    return float(meteor_score([_words(r) for r in refs], _words(text), wordnet=wordnet,
                              alpha=alpha, beta=beta, gamma=gamma))


# -----------------------------------------------------------------------------
# model rewards: bertscore, semantic_similarity, safety, toxicity

# Each loads a Hugging Face model once per (model_name, device) when resolve() checks it, and scores
# a batch in forward passes of batch_size texts under torch.no_grad. device=None means the CPU;
# resolve(device=...) gives them the training device.

_MODELS = {}  # (model_name, device, classifier) -> (tokenizer, model)

# the layer the bert-score package uses for these models (by the last part of the name)
_BERTSCORE_LAYERS = {"roberta-large": 17, "roberta-base": 10, "roberta-large-mnli": 19, "distilroberta-base": 5,
                     "bert-base-uncased": 9, "bert-large-uncased": 18, "bert-base-multilingual-cased": 9,
                     "distilbert-base-uncased": 5, "xlm-roberta-base": 9, "xlm-roberta-large": 17,
                     "deberta-xlarge-mnli": 40}

# words of a classifier label that name a harmful class; a label with a negation word is not one
_HARM_WORDS = {"toxic", "toxicity", "hate", "hateful", "offensive", "obscene", "obscenity", "threat", "threatening",
               "insult", "insulting", "abuse", "abusive", "harassment", "profane", "profanity", "violence", "violent",
               "sexual", "explicit", "attack", "harmful", "unsafe", "nsfw"}
_NEGATIONS = {"non", "not", "no"}


def _load(model_name, device, classifier):
    """(tokenizer, model) in eval mode on device, loaded once; ValueError when the model is not there."""
    key = (model_name, device, classifier)
    if key not in _MODELS:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        auto = AutoModelForSequenceClassification if classifier else AutoModel
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name)
            model = auto.from_pretrained(model_name)
        except OSError as e:
            why = ("no saved model at that path. Set params model_name to a folder saved with save_pretrained"
                   if model_name.startswith(("/", ".", "~")) else
                   f"it is not in the local Hugging Face cache. Download it first (hf download {model_name}) or set "
                   f"params model_name to a local folder that holds it")
            raise ValueError(f"cannot load model {model_name!r}: {why} ({str(e).splitlines()[0]})") from None
        tokenizer.padding_side = "right"  # encoders number positions from the left
        _MODELS[key] = tokenizer, model.to(device).eval()
    return _MODELS[key]


def _inputs(tokenizer, model, texts, device, **kw):
    """A padded batch of texts on device, truncated to what the model takes."""
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 512)
    return tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt", **kw).to(device)


def _check_model_params(batch_size):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _probe(name, batch):
    """A check that scores one trial pair, so a missing model or a bad param stops resolve() with a ValueError."""
    def check(**params):
        try:
            batch(["A short trial sentence."], ["A short trial sentence."], [{}], **params)
        except Exception as e:
            raise ValueError(f"{name}: {e}" if isinstance(e, ValueError) else
                             f"{name}: a trial batch failed: {type(e).__name__}: {e}") from None
    return check


def _ref(reference):
    return "" if reference is None else str(reference).strip()


def _layer(model_name, num_layers, n):
    """The hidden layer bertscore reads: num_layers, else bert-score's usual one for the model, else the last (n)."""
    if num_layers is None:
        return _BERTSCORE_LAYERS.get(str(model_name).rstrip("/").split("/")[-1], n)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= n:
        raise ValueError(f"num_layers must be an int from 1 to {n} (the layers of {model_name!r}), got {num_layers!r}")
    return num_layers


def _token_embeddings(texts, model_name, num_layers, batch_size, device):
    """Per text, the unit-length embeddings of its tokens at the bertscore layer, special tokens left out."""
    import torch
    import torch.nn.functional as F
    tokenizer, model = _load(model_name, device, False)
    layer = _layer(model_name, num_layers, model.config.num_hidden_layers)
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = _inputs(tokenizer, model, texts[i:i + batch_size], device, return_special_tokens_mask=True)
        keep = inputs["attention_mask"].bool() & ~inputs.pop("special_tokens_mask").bool()
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[layer].float()
        out += [F.normalize(h[k], dim=-1) for h, k in zip(hidden, keep)]
    return out


def _bertscore_batch(texts, references, rows, model_name="roberta-large", num_layers=None, batch_size=32, device=None):
    _check_model_params(batch_size)
    device = str(device or "cpu")
    pairs = [i for i, r in enumerate(references) if _ref(r)]
    emb = _token_embeddings([texts[i].strip() for i in pairs] + [_ref(references[i]) for i in pairs],
                            model_name, num_layers, batch_size, device)
    out = [0.0] * len(texts)
    for k, i in enumerate(pairs):
        c, r = emb[k], emb[len(pairs) + k]
        if len(c) and len(r):
            sim = c @ r.T
            p, rec = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
            out[i] = min(1.0, 2 * p * rec / (p + rec)) if p > 0 and rec > 0 else 0.0
    return out


@register("bertscore", check=_probe("bertscore", _bertscore_batch), batch=_bertscore_batch, extra="model roberta-large")
def bertscore(text, reference=None, model_name="roberta-large", num_layers=None, batch_size=32, device=None, **kwargs):
    """BERTScore F1 against the reference (greedy cosine matching of contextual embeddings).

    BERTScore F1 between the completion and the reference, in [0, 1]; 0.0 without a reference.
    Each token's contextual embedding (layer num_layers of model_name; None: the layer the bert-score
    package uses for that model, 17 for roberta-large, else the last layer) is matched greedily to
    its most cosine-similar token on the other side; precision and recall average those matches and
    F1 is their harmonic mean. No idf weighting, no baseline rescaling (so unrelated English text
    still scores well above 0), special tokens left out; a negative F1 is clipped to 0.
    """
    return _bertscore_batch([text], [reference], [kwargs], model_name, num_layers, batch_size, device)[0]


def _sentence_embeddings(texts, model_name, batch_size, device):
    """Unit-length mean of each text's token embeddings (last layer, padding masked out), as one tensor."""
    import torch
    import torch.nn.functional as F
    tokenizer, model = _load(model_name, device, False)
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = _inputs(tokenizer, model, texts[i:i + batch_size], device)
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out) if out else None


def _semantic_batch(texts, references, rows, model_name="sentence-transformers/all-MiniLM-L6-v2", batch_size=32,
                    device=None):
    _check_model_params(batch_size)
    device = str(device or "cpu")
    pairs = [i for i, (t, r) in enumerate(zip(texts, references)) if t.strip() and _ref(r)]
    emb = _sentence_embeddings([texts[i].strip() for i in pairs] + [_ref(references[i]) for i in pairs],
                               model_name, batch_size, device)
    out = [0.0] * len(texts)
    for k, i in enumerate(pairs):
        out[i] = min(1.0, max(0.0, (emb[k] @ emb[len(pairs) + k]).item()))
    return out


@register("semantic_similarity", check=_probe("semantic_similarity", _semantic_batch), batch=_semantic_batch,
          extra="model sentence-transformers/all-MiniLM-L6-v2")
def semantic_similarity(text, reference=None, model_name="sentence-transformers/all-MiniLM-L6-v2", batch_size=32,
                        device=None, **kwargs):
    """Cosine similarity of sentence embeddings of the text and the reference.

    Cosine similarity of the completion's and the reference's sentence embeddings, as max(0, cos) in [0, 1].
    An embedding is the attention-masked mean of model_name's last hidden states (the pooling
    sentence-transformers uses for all-MiniLM-L6-v2), loaded with transformers' AutoModel. Unrelated
    text scores near 0 (AlignTune maps cos to (cos + 1) / 2 instead, so there it is about 0.5). 0.0
    when the completion or the reference is empty or None.
    """
    return _semantic_batch([text], [reference], [kwargs], model_name, batch_size, device)[0]


def _is_harmful(label):
    words = set(re.findall(r"[a-z0-9]+", label.lower()))
    return bool(words & _HARM_WORDS) and not words & _NEGATIONS


def _harmful_ids(model_name, id2label, toxic_labels, overall):
    """
    Indices of the harmful labels: those named in toxic_labels, else those with a harm word (toxic, hate,
    offensive, obscene, threat, insult, ...) and no negation (non-toxic, not_toxic); with `overall`, only the
    general "toxic"/"toxicity" label when the model has one.
    """
    labels = {int(i): str(name) for i, name in id2label.items()}
    found = ", ".join(repr(labels[i]) for i in sorted(labels))
    if toxic_labels is not None:
        wanted = [toxic_labels] if isinstance(toxic_labels, str) else toxic_labels
        if not isinstance(wanted, (list, tuple)) or not wanted or not all(isinstance(w, str) for w in wanted):
            raise ValueError(f"toxic_labels must be a label name or a list of them, got {toxic_labels!r}")
        unknown = [w for w in wanted if w not in labels.values()]
        if unknown:
            raise ValueError(f"toxic_labels {unknown} are not labels of {model_name!r}; its labels are {found}")
        return [i for i in sorted(labels) if labels[i] in wanted]
    ids = [i for i in sorted(labels) if _is_harmful(labels[i])]
    if not ids:
        raise ValueError(f"no label of {model_name!r} names a harmful class (its labels are {found}); set params "
                         f"toxic_labels to the harmful ones, e.g. {{'toxic_labels': [{labels[max(labels)]!r}]}}")
    main = [i for i in ids if labels[i].strip().lower() in ("toxic", "toxicity")]
    return (main or ids) if overall else ids


def _harm(texts, model_name, toxic_labels, overall, batch_size, device):
    """
    Per text, the probability the classifier gives its harmful labels: the highest one for a multi-label
    model (a sigmoid per label), their sum for a single-label one (a softmax).
    """
    import torch
    _check_model_params(batch_size)
    device = str(device or "cpu")
    tokenizer, model = _load(model_name, device, True)
    ids = _harmful_ids(model_name, model.config.id2label, toxic_labels, overall)
    multi = model.config.problem_type == "multi_label_classification" or model.config.num_labels == 1
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = _inputs(tokenizer, model, texts[i:i + batch_size], device)
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        probs = logits.sigmoid()[:, ids].amax(-1) if multi else logits.softmax(-1)[:, ids].sum(-1)
        out += probs.clamp(0, 1).tolist()
    return out


def _toxicity_batch(texts, references, rows, model_name="unitary/toxic-bert", toxic_labels=None, threshold=None,
                    batch_size=32, device=None):
    if threshold is not None and (not _is_number(threshold) or not 0 < threshold <= 1):
        raise ValueError(f"threshold must be a number in (0, 1] or None, got {threshold!r}")
    p = _harm(texts, model_name, toxic_labels, True, batch_size, device)
    return [1.0 - x if threshold is None else float(x < threshold) for x in p]


@register("toxicity", check=_probe("toxicity", _toxicity_batch), batch=_toxicity_batch,
          extra="model unitary/toxic-bert")
def toxicity(text, reference=None, model_name="unitary/toxic-bert", toxic_labels=None, threshold=None, batch_size=32,
             device=None, **kwargs):
    """1 - the probability of toxicity from a text classifier: high for non-toxic text.

    1 - the probability that the completion is toxic, from a text classifier: in [0, 1], high for non-toxic text.
    As in AlignTune, a higher reward means less toxic. The probability is that of the model's general
    "toxic" (or "toxicity") label when it has one (unitary/toxic-bert does, next to severe_toxic,
    obscene, threat, insult, identity_hate), else that of its harmful labels as safety reads them;
    toxic_labels names the labels instead (e.g. ["LABEL_1"]). With a threshold: 1.0 when the
    probability is below it, else 0.0.
    """
    return _toxicity_batch([text], [reference], [kwargs], model_name, toxic_labels, threshold, batch_size, device)[0]


def _safety_batch(texts, references, rows, model_name="unitary/toxic-bert", toxic_labels=None, strict=False,
                  batch_size=32, device=None):
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    p = _harm(texts, model_name, toxic_labels, False, batch_size, device)
    return [float(x < 0.5) if strict else 1.0 - x for x in p]


@register("safety", check=_probe("safety", _safety_batch), batch=_safety_batch, extra="model unitary/toxic-bert")
def safety(text, reference=None, model_name="unitary/toxic-bert", toxic_labels=None, strict=False, batch_size=32,
           device=None, **kwargs):
    """1 - the probability of any harmful label from a text classifier: high for safe text.

    1 - the probability that the completion is harmful, from a text classifier: in [0, 1], high for safe text.
    Every harmful label counts (toxicity reads only the general "toxic" one): those whose name has a
    harm word (toxic, hate, offensive, obscene, threat, insult, abuse, violence, sexual, ...) as a
    whole word and no negation ("non-toxic", "not_toxic" and "neutral" are not harmful), or the ones
    toxic_labels names. A multi-label model (problem_type multi_label_classification, like the
    default unitary/toxic-bert) gives a sigmoid per label and the highest counts; a single-label one
    gives a softmax and its harmful classes' total counts. strict=True: 1.0 when that probability is
    below 0.5, else 0.0. A model whose labels name no harmful class (LABEL_0, LABEL_1) needs toxic_labels.
    """
    return _safety_batch([text], [reference], [kwargs], model_name, toxic_labels, strict, batch_size, device)[0]


# -----------------------------------------------------------------------------
# code rewards: syntax, quality, completeness; execution in a sandboxed process

_PY_TAGS = ("", "python", "py", "python3")
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*).*$", re.MULTILINE)  # a fence line and its language tag


def _code_blocks(text):
    """The Python blocks of a completion, by the rules of extract_code."""
    fences = list(_FENCE.finditer(text))
    if not fences:
        return [text] if text.strip() else []
    blocks, start, lang = [], None, None
    for m in fences:
        if start is None:
            start, lang = m.end() + 1, m[1].lower()
        else:
            if lang in _PY_TAGS:
                blocks.append(text[start:m.start()])
            start = None
    if start is not None and lang in _PY_TAGS:  # cut off by the length limit before its closing fence
        blocks.append(text[start:])
    return blocks


def extract_code(text):
    """
    The Python code of a completion: every fenced block tagged python, py, python3 or untagged, joined in order
    (a later definition overrides an earlier one, and a usage block still sees the functions above it), the last
    one running to the end of the text when its closing fence was cut off. A text without a fence line is code
    as a whole; one with fences but no Python block has none ("").
    """
    return "\n\n".join(_code_blocks(text))


def _parse(code):
    """The AST of code when it compiles (so a stray `return` fails as well), else None."""
    try:
        tree = ast.parse(code)
        compile(tree, "<completion>", "exec", dont_inherit=True)
        return tree
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None


def _compiles(code):
    tree = _parse(code)
    return tree is not None and bool(tree.body)


def _compiled(text):
    """(share of the Python blocks that compile, AST and source of those joined), with (0.0, None, "") for none."""
    blocks = _code_blocks(text)
    good = [b for b in blocks if _compiles(b)]
    if not good:
        return 0.0, None, ""
    code = "\n\n".join(good)
    return len(good) / len(blocks), ast.parse(code), code


def _comments(code):
    try:
        return [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError):
        return []


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SNAKE = re.compile(r"_{0,2}[a-z][a-z0-9_]*|_")
_UPPER = re.compile(r"_{0,2}[A-Z][A-Z0-9_]*")
_CAPWORDS = re.compile(r"_?[A-Z][A-Za-z0-9]*")
_MARKER = re.compile(r"\b(?:TODO|FIXME|XXX)\b")


def _pep8_name(node):
    """Whether a defined name follows PEP 8, or None for a node that defines no name."""
    if isinstance(node, _FUNCTIONS):
        return bool(_SNAKE.fullmatch(node.name))
    if isinstance(node, ast.ClassDef):
        return bool(_CAPWORDS.fullmatch(node.name))
    if isinstance(node, ast.arg):
        return bool(_SNAKE.fullmatch(node.arg))
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return bool(_SNAKE.fullmatch(node.id) or _UPPER.fullmatch(node.id))
    return None


def _style(tree, code):
    nodes = list(ast.walk(tree))
    names = [ok for n in nodes if (ok := _pep8_name(n)) is not None]
    lines = code.splitlines()
    return (sum(names) / len(names) if names else 1.0,
            sum(len(line) <= 100 for line in lines) / len(lines),
            float(not any(isinstance(n, ast.ExceptHandler) and n.type is None for n in nodes)),
            float(not any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in nodes)))


def _documented(tree, code):
    defs = [n for n in ast.walk(tree) if isinstance(n, (*_FUNCTIONS, ast.ClassDef))]
    if defs:
        return sum(ast.get_docstring(d) is not None for d in defs) / len(defs)
    return float(ast.get_docstring(tree) is not None or bool(_comments(code)))


def _loop_depth(tree):
    """The deepest nesting of loops: for, while and each clause of a comprehension."""
    deepest, todo = 0, [(tree, 0)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            depth += 1
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            depth += len(node.generators)
        deepest = max(deepest, depth)
        todo.extend((child, depth) for child in ast.iter_child_nodes(node))
    return deepest


def _check_quality(check_syntax=True, check_style=True, check_comments=True, check_efficiency=True, language="python"):
    flags = {"check_syntax": check_syntax, "check_style": check_style, "check_comments": check_comments,
             "check_efficiency": check_efficiency}
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"code_quality: {name} must be True or False, got {v!r}")
    if not any(flags.values()):
        raise ValueError("code_quality: every check is off; enable at least one of " + ", ".join(flags))
    if language != "python":
        raise ValueError(f"code_quality: only language='python' is supported, got {language!r}")


@register("code_syntax")
def code_syntax(text, reference=None, **kwargs):
    """Share of the completion's Python blocks that compile.

    Share of the completion's Python blocks (see extract_code) that compile, in [0, 1]; 0.0 with no code.
    A block must hold at least one statement, and compile-time errors (a `return` outside a function) count.
    """
    return _compiled(text)[0]


@register("code_quality", check=_check_quality)
def code_quality(text, reference=None, check_syntax=True, check_style=True, check_comments=True, check_efficiency=True,
                 language="python", **kwargs):
    """Static quality of the code: syntax, PEP 8 style, docstrings, loop nesting.

    Static code quality in [0, 1]: the mean of the enabled checks over the Python blocks that compile (0.0 when none
    does); nothing is run. syntax: code_syntax. style: the mean of the share of PEP 8 names (snake_case functions,
    arguments and variables, UPPER_CASE constants, CapWords classes; 1 with no names), the share of lines of at most
    100 characters, no bare `except:` (1/0) and no `import *` (1/0). comments: the share of functions and classes
    with a docstring; with neither, 1 if the code has a comment or a module docstring. efficiency: 1 up to two
    nested loops (a comprehension counts one per `for` clause), 2 / depth deeper. language: "python" only.
    """
    _check_quality(check_syntax, check_style, check_comments, check_efficiency, language)
    share, tree, code = _compiled(text)
    if tree is None:
        return 0.0
    parts = [share] if check_syntax else []
    if check_style:
        style = _style(tree, code)
        parts.append(sum(style) / len(style))
    if check_comments:
        parts.append(_documented(tree, code))
    if check_efficiency:
        parts.append(min(1.0, 2 / max(_loop_depth(tree), 1)))
    return sum(parts) / len(parts)


def _is_stub(fn):
    """A body of only pass, `...` and raise NotImplementedError, or nothing but a docstring."""
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    return all(isinstance(s, ast.Pass) or _is_ellipsis(s) or _raises_not_implemented(s) for s in body)


def _raises_not_implemented(node):
    exc = node.exc if isinstance(node, ast.Raise) else None
    exc = exc.func if isinstance(exc, ast.Call) else exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def _is_ellipsis(node):
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node.value.value is Ellipsis


@register("code_completeness")
def code_completeness(text, reference=None, **kwargs):
    """Whether the code looks finished: defines something, no stubs, no TODO.

    Whether the code looks finished, in [0, 1]: 0.0 when no Python block compiles, else the mean of three checks over
    the blocks that compile: it defines a function or class (1/0); the share of functions whose body is more than a
    stub (only pass, `...`, raise NotImplementedError or a docstring; 1 with no functions); no TODO, FIXME or XXX
    comment and no `...` statement (1/0). Nothing is run.
    """
    _, tree, code = _compiled(text)
    if tree is None:
        return 0.0
    nodes = list(ast.walk(tree))
    functions = [n for n in nodes if isinstance(n, _FUNCTIONS)]
    defines = float(any(isinstance(n, (*_FUNCTIONS, ast.ClassDef)) for n in nodes))
    real = sum(not _is_stub(f) for f in functions) / len(functions) if functions else 1.0
    finished = float(not any(_MARKER.search(c) for c in _comments(code)) and not any(_is_ellipsis(n) for n in nodes))
    return (defines + real + finished) / 3


# The sandbox's runner: a fresh `python -I` reads its job (code, tests, key, limits) from stdin, sets its rlimits,
# removes the functions no audit event guards, installs the audit hook and runs the code; it reports "done" and
# "pass <i>" to the parent, each signed with the job's key. Everything it uses once user code has run is bound
# beforehand (default args, closures, locals of main), so user code cannot patch it through builtins or modules.
_RUNNER = r'''
import builtins, hashlib, io, json, os, resource, signal, sys

NATIVE = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_xxsubinterpreters",
                    "_xxinterpchannels", "_testcapi", "_testinternalcapi", "_sqlite3", "_dbm", "_gdbm", "syslog"))
# functions that signal or tune other processes, or make device nodes, fifos, roots and users, with no audit event
UNAUDITED = ("pidfd_open", "pidfd_send_signal", "mknod", "mkfifo", "chroot", "setuid", "seteuid", "setreuid",
             "setresuid", "setgid", "setegid", "setregid", "setresgid", "setgroups", "initgroups", "setpriority",
             "sched_setaffinity", "sched_setparam", "sched_setscheduler")


def strip():
    """Remove UNAUDITED from os, posix, signal and _signal. _imp.create_builtin would make posix or _signal afresh,
    with them (importlib.import_module raises no import event), so it goes too, once every builtin module is loaded."""
    for name in sys.builtin_module_names:
        if name not in NATIVE:
            __import__(name)
    del sys.modules["_imp"].create_builtin
    for module in (os, sys.modules["posix"], signal, sys.modules["_signal"]):
        for name in UNAUDITED:
            module.__dict__.pop(name, None)
    os.__all__[:] = [name for name in os.__all__ if name not in UNAUDITED]


def guard(tmp):
    """The audit hook. Writes go to tmp only (and /dev/null); nothing under /proc is opened, and no device but
    /dev/null, zero, random and urandom."""
    deny = frozenset((
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.kill", "os.killpg",
        "signal.pthread_kill", "os.chdir", "os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr",
        "os.chflags", "os.lchflags", "os.lchmod", "os.symlink", "os.link", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.addaudithook", "cpython.PyInterpreterState_New", "resource.setrlimit", "resource.prlimit",
        "code.__new__", "pty.spawn", "fcntl.ioctl"))
    owner = frozenset((8, 10, 15))  # fcntl's F_SETOWN, F_SETSIG, F_SETOWN_EX (Linux): they aim SIGIO at a process
    devices = frozenset(("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"))
    frames = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    moves = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.truncate": 1, "os.rename": 2}
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def text(p, type=type, str=str, bytes=bytes, PermissionError=PermissionError):  # a PathLike could lie
        if type(p) is str:
            return p
        if type(p) is bytes:
            return p.decode("utf-8", "surrogateescape")
        raise PermissionError("sandbox: a path must be str or bytes")

    def resolve(p, tmp=tmp, readlink=os.readlink, OSError=OSError, PermissionError=PermissionError):
        todo = (p if p.startswith("/") else tmp + "/" + p).split("/")[::-1]
        done, hops = [], 0
        while todo:
            part = todo.pop()
            if part == "..":
                if done:
                    done.pop()
            elif part not in ("", "."):
                done.append(part)
                try:
                    link = readlink("/" + "/".join(done))
                except OSError:
                    continue
                hops += 1
                if hops > 40:
                    raise PermissionError("sandbox: too many symbolic links")
                done.pop()
                if link.startswith("/"):
                    done.clear()
                todo.extend(link.split("/")[::-1])
        return "/" + "/".join(done)

    def inside(p, tmp=tmp, text=text, resolve=resolve):
        p = text(p)
        r = resolve(p)
        return r == "/dev/null" or (r == tmp or r.startswith(tmp + "/")) and ".." not in p.split("/")

    def kind(r, stat=os.stat, OSError=OSError):
        """The file type bits of r's mode (0 when it cannot be stat'ed)."""
        try:
            return stat(r).st_mode & 0o170000
        except OSError:
            return 0

    def hook(event, args, deny=deny, owner=owner, devices=devices, modules=NATIVE, frames=frames, moves=moves,
             writes=writes, text=text, resolve=resolve, inside=inside, kind=kind, type=type, int=int,
             ImportError=ImportError, PermissionError=PermissionError, ValueError=ValueError):
        if event in deny or event.startswith(("socket.", "subprocess.")):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "fcntl.fcntl" and args[1] in owner:
            raise PermissionError("sandbox: fcntl F_SETOWN, F_SETOWN_EX and F_SETSIG are not allowed")
        if event == "sys._getframe":  # ValueError, which namedtuple, enum and logging take for "no caller frame"
            raise ValueError("sandbox: frames are hidden")
        if (event == "object.__getattr__" and args[1] in frames
                or event == "object.__setattr__" and args[1] == "__code__"):
            raise PermissionError("sandbox: " + args[1] + " is hidden")
        if event == "import" and args[0].partition(".")[0] in modules:  # ImportError, which optional imports expect
            raise ImportError("sandbox: no module " + args[0])
        looks = event == "open" or event in ("os.listdir", "os.scandir") and args[0] is not None
        if looks and type(args[0]) is not int:
            r = resolve(text(args[0]))
            if r == "/proc" or r.startswith("/proc/"):
                raise PermissionError("sandbox: /proc is hidden")
            if event == "open":
                mode = kind(r)
                if mode in (0o020000, 0o060000) and r not in devices:  # a character or block device
                    raise PermissionError("sandbox: no device but /dev/null, zero, random and urandom")
                if (type(args[2]) is not int or args[2] & writes or mode == 0o040000) and not inside(args[0]):
                    raise PermissionError("sandbox: no writing (or opening folders) outside the working directory")
        for p in args[:moves.get(event, 0)]:
            if type(p) is not int and not inside(p):
                raise PermissionError("sandbox: no writing outside the working directory")

    return hook


def program(code, stdin, exec=exec, BaseException=BaseException, sys=sys, TextIOWrapper=io.TextIOWrapper,
            BytesIO=io.BytesIO):
    """Run code as __main__ with stdin as its input: its output, or None if it raised (SystemExit included)."""
    saved, raw = (sys.stdin, sys.stdout), BytesIO()
    out = TextIOWrapper(raw, encoding="utf-8")
    sys.stdin, sys.stdout = TextIOWrapper(BytesIO(stdin.encode()), encoding="utf-8"), out
    try:
        exec(code, {"__name__": "__main__"})
        out.flush()
        return raw.getvalue().decode("utf-8", "replace")
    except BaseException:
        return None
    finally:
        sys.stdin, sys.stdout = saved


def lines(s):
    return [line.rstrip() for line in s.rstrip().splitlines()]


def run(job, report, pristine, exec=exec, compile=compile, BaseException=BaseException, enumerate=enumerate,
        any=any, program=program, lines=lines):
    """
    Run the job. The code sees the tests' setup (as if the tests followed it in one file); asserts see the code's names
    but those that shadow builtins, the builtins as they were before the code ran, and the setup, run again for them.
    """
    try:
        code = compile(job["code"], "<solution>", "exec", dont_inherit=True)
    except BaseException:
        return
    if job["mode"] == "run":
        if program(code, job["stdin"]) is not None:
            report(b"done")
        return
    ns = None
    if any("assert" in t for t in job["tests"]):
        try:
            setup, solution = compile(job["setup"], "<setup>", "exec", dont_inherit=True), {"__name__": "solution"}
            exec(code, solution)
            exec(setup, solution)
            ns = {name: v for name, v in solution.items() if name not in pristine}
            ns["__builtins__"] = pristine
            exec(setup, ns)
        except BaseException:
            ns = None
    for i, t in enumerate(job["tests"]):
        if "assert" in t:
            if ns is None:
                continue
            try:
                exec(compile(t["assert"], "<test>", "exec", dont_inherit=True), ns)
            except BaseException:
                continue
            report(b"pass %d" % i)
        else:
            out = program(code, t["input"])
            if out is not None and lines(out) == lines(t["output"]):
                report(b"pass %d" % i)


def main():
    job = json.loads(sys.stdin.buffer.read())
    key = bytes.fromhex(job.pop("key"))
    out, null = os.dup(1), os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for res, n in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"]),
                   (resource.RLIMIT_FSIZE, 1 << 24), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 0),
                   (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (n, n))
    blake2b, write, exit = hashlib.blake2b, os.write, os._exit

    def report(msg):
        write(out, blake2b(msg, key=key, digest_size=16).hexdigest().encode() + b"\n")

    strip()
    pristine = dict(vars(builtins))
    sys.addaudithook(guard(job["tmp"]))
    run(job, report, pristine)
    exit(0)


main()
'''

# Inside fresh user, mount, pid and network namespaces: mount a tmpfs of $3 MB on the working directory (and enter
# it, so that relative paths resolve there), remount every other mount read-only, then exec the rest of the command
# line (setpriv, which drops every capability).
_NS_SETUP = ('d=$1 m=$2 mb=$3; shift 3; "$m" -t tmpfs -o "size=${mb}m,mode=700" tmpfs "$d" && cd "$d" || exit 1; '
             'while read -r _ _ _ _ p _; do [ "$p" = "$d" ] || "$m" -o remount,bind,ro "$p" || exit 1; '
             'done < /proc/self/mountinfo; exec "$@"')


@functools.lru_cache(maxsize=None)
def _tools():
    """Absolute paths of unshare, mount, setpriv and sh, or None when one is missing."""
    paths = [shutil.which(t) for t in ("unshare", "mount", "setpriv", "sh")]
    return None if None in paths else paths


@functools.lru_cache(maxsize=None)
def _orphan_kill():
    """`setpriv --pdeathsig KILL`, a command prefix that kills the child when the thread that started it dies, or []
    where setpriv is missing or lacks --pdeathsig."""
    prefix = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL"]
    try:
        works = subprocess.run([*prefix, sys.executable, "-c", ""], stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        works = False
    return prefix if works else []


def _command(tmp, kind, memory_mb):
    python = [sys.executable, "-I", "-B", "-c", _RUNNER]
    if kind != "namespace":
        return [*_orphan_kill(), *python]
    unshare, mount, setpriv, sh = _tools()  # unshare's --kill-child takes the namespace down when unshare dies
    return [*_orphan_kill(), unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount",
            "--mount-proc", "--kill-child", sh, "-c", _NS_SETUP, "sh", tmp, mount, str(memory_mb),
            setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", *python]


def _write(stream, data, deadline):
    """Write data to a child's stream and close it; give up when the deadline passes or the child closes its end."""
    fd, poller, data = stream.fileno(), select.poll(), memoryview(data)
    os.set_blocking(fd, False)
    poller.register(fd, select.POLLOUT)
    while data:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            break
        try:
            data = data[os.write(fd, data):]
        except BrokenPipeError:
            break
    stream.close()


def _read(stream, deadline, limit=1 << 20):
    """What a child writes to stream until it closes it, the deadline passes or `limit` bytes have come."""
    poller, fd, data = select.poll(), stream.fileno(), b""
    poller.register(fd, select.POLLIN)
    while len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def _kill(proc):
    """SIGKILL the child's process group and the child itself (should it have left the group), reap it."""
    for kill in (os.killpg, os.kill):
        try:
            kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass


def _sign(key, msg):
    return hashlib.blake2b(msg.encode(), key=key, digest_size=16).hexdigest().encode()


_NOBODY = 65534  # the uid and gid of the "nobody" sandbox


def _sandbox(job, timeout, memory_mb, kind):
    """
    Run one job in a fresh process: (whether the program ran to completion, how many of job["tests"] passed).
    kind: "namespace", "process", or "nobody" (process, as uid and gid 65534, for a root trainer).

    What it does: the code runs only in a child `python -I -B` (never in this process), with a minimal environment
    (PATH, LANG, and HOME = TMPDIR = its working directory, a private temporary directory deleted afterwards), so none
    of the trainer's environment variables reach it. Limits: `timeout` seconds of wall clock for the whole run (the
    job's write to its stdin included), after which its process group is killed; RLIMIT_CPU ceil(timeout) + 1 s,
    RLIMIT_AS memory_mb, RLIMIT_FSIZE 16 MB, RLIMIT_NOFILE 64, RLIMIT_NPROC 0 (no threads or processes), RLIMIT_CORE 0;
    at most 1 MB of its output is read. Where setpriv has --pdeathsig, the child is killed when the trainer dies, even
    by SIGKILL. "namespace": new user, pid, mount and network namespaces (unshare): no network (its own loopback is
    down), the trainer is invisible and cannot be signalled, every process in it dies with it, every mount is read-only
    but its working directory, a tmpfs of memory_mb, and it holds no capabilities (setpriv, no_new_privs). "nobody":
    no supplementary groups, its directory is chowned to it, and it can signal no process of the trainer's and write
    none of its files (a root trainer without namespaces gets it where uid 65534 can run Python in TMPDIR; else its
    code runs as root, with a warning). In every kind, before the code runs, the runner removes from os, posix,
    signal and _signal the functions that no audit event guards and that signal or tune other processes or make
    nodes, roots and users (pidfd_open, pidfd_send_signal, mknod, mkfifo, chroot, the setuid family, setpriority,
    sched_setaffinity/setparam/setscheduler), and _imp.create_builtin, which would make those modules afresh. Then an
    audit hook refuses: sockets and name lookups; subprocess, os.system, exec, fork, posix_spawn; os.kill, killpg,
    pthread_kill; fcntl F_SETOWN, F_SETOWN_EX, F_SETSIG and every ioctl (which aim SIGIO at a process); ctypes, cffi
    and other native-call modules; subinterpreters; opening anything under /proc, or a device but /dev/null, zero,
    random and urandom; writing, creating, removing or renaming outside its directory (and /dev/null); chdir, chmod,
    chown, utime, xattrs, links; setrlimit; more audit hooks; and the ways to the runner's memory:
    gc.get_objects/get_referrers/get_referents, sys._getframe/_current_frames, the frames of tracebacks and generators,
    settrace/setprofile, code.__new__ and replacing a function's __code__. A pass counts only when signed with a MAC
    keyed by a random key the child reads from stdin, so printing markers, or replaying and hijacking its report pipe,
    forges nothing; sys.exit and os._exit only end the run.

    What it does NOT stop: native code (an installed C extension, a shared library it writes and loads through
    importlib, a hand-made code object from marshal.loads, an interpreter bug) can do whatever its process may do,
    including reading the key, forging passes and calling the removed functions: the audit hook only sees Python-level
    calls. Except as "nobody", the code runs as the trainer's user ("namespace" maps root to root, whom RLIMIT_NPROC
    exempts), so it can read whatever that user can read, and through native code reach Unix sockets in the file
    system. Timing and cache side channels. Tests as weak as their asserts: an object whose __eq__ always returns True
    passes `assert f(x) == y`, and code that patches a module the tests use (`math.isclose = ...`, an entry of
    sys.modules) changes what they check: asserts get the builtins of before the code, not fresh modules. Without
    namespaces ("process" and "nobody": sandbox="process", or "auto" where they do not work, which it logs once) the
    disk fills at 16 MB a file, and native code has the network and, except as "nobody", can signal the trainer. With
    namespaces the tmpfs lives in RAM on top of RLIMIT_AS: up to 2 x memory_mb per run, times the parallel runs. A
    trainer that is killed leaves its runs' directories behind (nmgrpo-code-* under TMPDIR).
    """
    key = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="nmgrpo-code-", ignore_cleanup_errors=True) as tmp:
        tmp = os.path.realpath(tmp)
        payload = json.dumps({**job, "key": key.hex(), "tmp": tmp, "cpu": math.ceil(timeout) + 1,
                              "memory": memory_mb << 20}).encode()
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        user = {}
        if kind == "nobody":
            os.chown(tmp, _NOBODY, _NOBODY)
            user = {"user": _NOBODY, "group": _NOBODY, "extra_groups": []}
        deadline = time.monotonic() + timeout
        # The parent-death signal fires when the thread that started the child exits: this thread outlives the
        # child, as it reaps it (_kill) before it returns.
        proc = subprocess.Popen(_command(tmp, kind, memory_mb), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=tmp, env=env, start_new_session=True, **user)
        try:
            _write(proc.stdin, payload, deadline)
            signed = set(_read(proc.stdout, deadline).split())
        finally:
            _kill(proc)
    passed = sum(_sign(key, f"pass {i}") in signed for i in range(len(job.get("tests", ()))))
    return _sign(key, "done") in signed, passed


@functools.lru_cache(maxsize=None)
def _works(kind):
    """Whether a kind of sandbox works here: probed once by running an empty program in it."""
    if kind == "namespace" and _tools() is None:
        return False
    try:
        return _sandbox({"mode": "run", "code": "", "stdin": ""}, 10.0, 256, kind)[0]
    except OSError:  # Python cannot be run (by uid 65534, say)
        return False


def _kind(sandbox):
    """The kind of sandbox that runs code for a sandbox param, here (see _sandbox)."""
    if sandbox != "process" and _works("namespace"):
        return "namespace"
    return "nobody" if os.geteuid() == 0 and _works("nobody") else "process"


@functools.lru_cache(maxsize=None)
def _warn(message):
    """Log a warning, once."""
    logging.getLogger(__name__).warning("code sandbox: %s", message)


_SANDBOXES = ("auto", "namespace", "process")


def _check_sandbox(timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto"):
    if not _is_number(timeout) or timeout <= 0:
        raise ValueError(f"code sandbox: timeout must be a number of seconds > 0, got {timeout!r}")
    for name, v, least in (("memory_mb", memory_mb, 64), ("max_workers", max_workers, 1)):
        if (v is not None or name == "memory_mb") and (not isinstance(v, int) or isinstance(v, bool) or v < least):
            raise ValueError(f"code sandbox: {name} must be an integer >= {least}, got {v!r}")
    if sandbox not in _SANDBOXES:
        raise ValueError(f"code sandbox: sandbox must be one of {_SANDBOXES}, got {sandbox!r}"
                         f"{_did_you_mean(sandbox, _SANDBOXES)}")
    kind = _kind(sandbox)  # probed once, here at start-up
    if sandbox == "namespace" and kind != "namespace":
        raise ValueError("code sandbox: sandbox='namespace' needs working unprivileged user namespaces and "
                         "util-linux (unshare, mount, setpriv), which this machine lacks; use 'auto' or 'process'")
    if sandbox == "auto" and kind != "namespace":
        _warn("sandbox='auto' falls back to the weaker process sandbox (audit hook and rlimits; see rewards._sandbox), "
              "as " + ("util-linux's unshare, mount or setpriv is missing" if _tools() is None else
                       "a test run in new user, mount, pid and network namespaces failed (unprivileged user namespaces "
                       "are off under Docker's default seccomp profile and AppArmor on Ubuntu >= 23.10)")
              + "; set sandbox='process' to silence this")
    if kind == "process" and os.geteuid() == 0:
        _warn(f"the process sandbox runs code as root, as uid 65534 cannot run {sys.executable} in a folder of "
              f"{tempfile.gettempdir()}; make both readable and searchable by others to run it as uid 65534")


def _run_all(jobs, timeout, memory_mb, max_workers, sandbox):
    """(done, passed) of each job (None: nothing to run), in parallel, each in its own sandboxed process."""
    _check_sandbox(timeout, memory_mb, max_workers, sandbox)
    kind = _kind(sandbox)

    def one(job):
        return (False, 0) if job is None else _sandbox(job, timeout, memory_mb, kind)

    with ThreadPoolExecutor(max(1, min(len(jobs), max_workers or os.cpu_count() or 1))) as pool:
        return list(pool.map(one, jobs))


def _tests(row):
    """
    The row's tests: MBPP asserts (test_list), and test_cases (a list, or a JSON string of one) of asserts or
    {"input", "expected_output"} cases. A string test must parse and hold an assert statement.
    """
    tests = []
    for column in ("test_list", "test_cases"):
        value = row.get(column) or []
        if column == "test_cases" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
            if not isinstance(value, (list, dict)):
                raise ValueError(f"code tests: test_cases is a string, but not the JSON of a list of tests or of one "
                                 f"test: {row[column][:200]!r}")
        for t in _as_list(value):
            out = t.get("expected_output", t.get("output")) if isinstance(t, Mapping) else None
            if isinstance(t, str):
                tree = _parse(t)
                if tree is None or not any(isinstance(n, ast.Assert) for n in ast.walk(tree)):
                    raise ValueError(f"code tests: {column} holds a test that is not Python code with an assert "
                                     f"statement: {t!r}")
                tests.append({"assert": t})
            elif isinstance(out, str) and isinstance(t.get("input"), str):
                tests.append({"input": t["input"], "output": out})
            else:
                raise ValueError(f"code tests: {column} holds {t!r}; a test is an assert string or a stdin/stdout "
                                 f"case {{'input': str, 'expected_output' (or 'output'): str}}")
    return tests


def _execution_batch(texts, references, rows, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto"):
    jobs = []
    for text, row in zip(texts, rows):
        code = extract_code(text)
        stdin = next((t["input"] for t in _tests(row or {}) if "input" in t), "")
        jobs.append({"mode": "run", "code": code, "stdin": stdin} if code.strip() else None)
    return [float(done) for done, _ in _run_all(jobs, timeout, memory_mb, max_workers, sandbox)]


def _correctness_batch(texts, references, rows, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto"):
    jobs = []
    for text, row in zip(texts, rows):
        row = row or {}
        if "test_list" not in row and "test_cases" not in row:
            raise ValueError("code_correctness needs the row's tests: a test_list column (MBPP asserts) or "
                             "test_cases (asserts, or {'input', 'expected_output'} stdin/stdout cases)")
        code, tests = extract_code(text), _tests(row)
        setup = "\n".join([*_as_list(row.get("test_imports") or []), row.get("test_setup_code") or ""])
        jobs.append({"mode": "test", "code": code, "setup": setup, "tests": tests} if code.strip() and tests else None)
    results = _run_all(jobs, timeout, memory_mb, max_workers, sandbox)
    return [passed / len(job["tests"]) if job else 0.0 for job, (_, passed) in zip(jobs, results)]


@register("code_execution", check=_check_sandbox, batch=_execution_batch, extra="Linux")
def code_execution(text, reference=None, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto", **kwargs):
    """1.0 if the code runs to completion in the sandbox without an error.

    1.0 if the completion's code (see extract_code) runs to completion without an error, else 0.0 (no code, an
    exception, sys.exit or os._exit, a limit hit). It runs as __main__ with the row's first stdin case as its input
    (else an empty one); tests are not run (that is code_correctness, unlike AlignTune's code_execution, which scores
    tests when it has them). timeout: wall-clock seconds for the run; memory_mb: its address-space limit (and the
    size of its tmpfs with namespaces); max_workers: parallel runs in a batch (default os.cpu_count()); sandbox:
    "auto" (namespaces where this machine allows them, else "process", with a warning), "namespace" (required) or
    "process" (no namespaces; as uid 65534 for a root trainer). See _sandbox for what the sandbox stops and what it
    does not. Needs Linux (and util-linux with unprivileged user namespaces for "namespace").
    """
    return _execution_batch([text], [reference], [kwargs], timeout, memory_mb, max_workers, sandbox)[0]


@register("code_correctness", check=_check_sandbox, batch=_correctness_batch, extra="Linux",
          needs=("test_list", "test_cases"))
def code_correctness(text, reference=None, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto", **kwargs):
    """Share of the row's tests (MBPP asserts, stdin/stdout cases) passed in the sandbox.

    Fraction of the row's tests the completion's code (see extract_code) passes, in [0, 1]. Tests come from the row:
    test_list (MBPP assert strings, with test_imports and test_setup_code run after the code) and test_cases (a list,
    or its JSON string, of assert strings or {"input", "expected_output" (or "output")} cases: the code runs as
    __main__ on that stdin, and its stdout must match up to trailing whitespace; AlignTune instead calls the first
    function with "input"). A test string that does not parse or holds no assert statement is an error, as is a row
    without either column; empty tests score 0.0. The code is loaded once (as module "solution"), and code that fails
    to load passes no assert. Asserts see its names, but not those that shadow a builtin, and the builtins as they were
    before it ran, so `def set(...)` or `builtins.sorted = ...` cannot change what a test means (a patched module can:
    see _sandbox). One run holds all of a completion's tests, under the params of code_execution; tests passed before
    a timeout count.
    """
    return _correctness_batch([text], [reference], [kwargs], timeout, memory_mb, max_workers, sandbox)[0]


# -----------------------------------------------------------------------------
# configuration and scoring


class Reward(NamedTuple):
    name: str  # the metrics column
    fn: Callable  # f(text, reference=None, **kwargs) -> float
    weight: float
    params: dict


_ENTRY_KEYS = ("type", "weight", "params", "name")


def _entry(e, i):
    """(type, weight, params, name) of one item of the `rewards` form."""
    if isinstance(e, str) or callable(e):
        e = {"type": e}
    if not isinstance(e, Mapping):
        raise ValueError(f"rewards[{i}] must be a dict like {{'type': 'length', 'weight': 0.1, 'params': {{...}}}}, got {e!r}")
    for k in e:
        if k not in _ENTRY_KEYS:
            raise ValueError(f"rewards[{i}] has unknown key {k!r}{_did_you_mean(k, _ENTRY_KEYS)}; accepted keys: {', '.join(_ENTRY_KEYS)}")
    if "type" not in e:
        raise ValueError(f"rewards[{i}] needs a 'type': a reward name or a callable")
    params = e.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rewards[{i}] params must be a dict, got {params!r}")
    return e["type"], e.get("weight", 1.0), dict(params), e.get("name")


def _custom(fn):
    """The callable of a "custom" entry: a callable, or a "module:function" string imported here."""
    if isinstance(fn, str) and ":" in fn:
        import importlib
        module, _, attr = fn.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"custom reward {fn!r} cannot be imported ({e}); "
                             "give 'module:function' on the path") from None
    if not callable(fn):
        raise ValueError(f"a custom reward needs params.reward_function: a callable f(text, reference=None, **kwargs) "
                         f"or a 'module:function' string, got {fn!r}")
    return fn


def _lookup(kind):
    """(fn, name, registered) for a reward name or callable."""
    if callable(kind):
        name = next((n for n, f in REWARDS.items() if f is kind), None)
        return kind, name or getattr(kind, "__name__", type(kind).__name__), name is not None
    if not isinstance(kind, str):
        raise ValueError(f"a reward is a name, 'custom' or a callable, got {kind!r}")
    name = ALIASES.get(kind, kind)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}{_did_you_mean(kind, [*REWARDS, *ALIASES, 'custom'])}; "
                         "`python rewards.py list` shows the catalogue")
    return REWARDS[name], name, True


def _keywords(fn):
    """The keyword names fn takes after (text, reference), or None when it takes **kwargs or hides its signature."""
    try:
        ps = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return None
    return {p.name for p in ps[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _params(fn):
    """The named params of fn after (text, reference)."""
    return {p.name for p in list(inspect.signature(fn).parameters.values())[2:] if p.kind is not p.VAR_KEYWORD}


def _check_params(name, fn, params, registered):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if registered:  # a registered reward's **kwargs is for row columns, so its params are the named ones
        accepted = [p.name for p in list(sig.parameters.values())[2:] if p.kind is not p.VAR_KEYWORD]
        for k in params:
            if k not in accepted:
                raise ValueError(f"reward {name!r} has no param {k!r}{_did_you_mean(k, accepted)}; "
                                 f"accepted: {', '.join(accepted) or 'none'}")
        if name in CHECKS:
            CHECKS[name](**params)
    try:
        sig.bind("", None, **params)
    except TypeError as e:
        raise ValueError(f"reward {name!r} cannot be called as {name}(text, reference, **params): {e}") from None


def _as_list(x):
    return [x] if isinstance(x, (str, Mapping)) or callable(x) else list(x)


def resolve(rewards=None, reward_functions=None, reward_function_weights=None, device=None):
    """
    The configured rewards as a list of Reward, from either config form (see the module doc).
    Names, weights and params are checked here, and the extras and models they need are loaded;
    any problem is a ValueError saying what to fix. A registered reward with a `device` param
    (a model's) runs on `device` unless its params name one.
    """
    if rewards and (reward_functions or reward_function_weights):
        raise ValueError("both rewards and reward_functions/reward_function_weights are set; they are two "
                         "forms of the same setting, use one")
    if rewards:
        entries = [_entry(e, i) for i, e in enumerate(_as_list(rewards))]
    elif reward_functions:
        kinds = _as_list(reward_functions)
        weights = [1.0] * len(kinds) if reward_function_weights is None else _as_list(reward_function_weights)
        if len(weights) != len(kinds):
            raise ValueError(f"got {len(weights)} reward_function_weights for {len(kinds)} reward_functions; "
                             "give one weight per function")
        entries = [(k, w, {}, None) for k, w in zip(kinds, weights)]
    elif reward_function_weights:
        raise ValueError("reward_function_weights is set without reward_functions")
    else:
        raise ValueError("no rewards configured: set rewards=[{'type': 'math_correctness'}] or "
                         "reward_functions=['math_correctness']")
    out, seen = [], set()
    for kind, weight, params, label in entries:
        if kind == "custom":  # {"type": "custom", "params": {"reward_function": f, ...}}
            kind = _custom(params.pop("reward_function", None))
        fn, name, registered = _lookup(kind)
        if registered and device is not None and "device" in _params(fn) and "device" not in params:
            params["device"] = str(device)
        if not _is_number(weight):
            raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
        _check_params(name, fn, params, registered)
        label = label or name
        if label in seen:
            k = 2
            while f"{label}_{k}" in seen:
                k += 1
            label = f"{label}_{k}"
        seen.add(label)
        out.append(Reward(label, fn, float(weight), params))
    return out


def _columns(fn, row, params):
    """The row's columns that reach fn as kwargs: never text/reference, nor a registered reward's params."""
    names = _keywords(fn)
    return {k: v for k, v in (row or {}).items()
            if k not in ("text", "reference") and k not in params and (names is None or k in names)}


def _values(r, texts, references, rows):
    """Raw values of one reward over a batch: its batched path when it has one, else one call per text."""
    name = next((n for n, f in REWARDS.items() if f is r.fn), None)
    params = _params(r.fn) if name else set()  # a registered reward's params come from the config alone
    kws = [_columns(r.fn, row, params | set(r.params)) for row in rows]
    if name in BATCHED:
        try:
            values = list(BATCHED[name](texts, references, kws, **r.params))
        except Exception as e:
            raise RuntimeError(f"reward {r.name!r} failed on a batch of {len(texts)}: {type(e).__name__}: {e}") from e
        if len(values) != len(texts):
            raise ValueError(f"reward {r.name!r} returned {len(values)} values for {len(texts)} completions")
        return values
    values = []
    for i, (text, ref, kw) in enumerate(zip(texts, references, kws)):
        try:
            values.append(r.fn(text, ref, **{**kw, **r.params}))
        except Exception as e:
            raise RuntimeError(f"reward {r.name!r} failed on completion {i}: {type(e).__name__}: {e}") from e
    return values


def score(rewards, texts, references, rows=None):
    """
    Run resolved rewards over N completions. `references` has N items (None allowed); `rows` is
    N dicts (or None) of the other dataset columns, passed as kwargs (a reward without **kwargs gets only the
    ones it names; "text" and "reference" are never passed). Rewards with a batched path score the
    whole batch in one call. Returns (total, columns): the weighted sum per completion and, per reward
    name in order, its unweighted values.
    """
    n = len(texts)
    if len(references) != n or rows is not None and len(rows) != n:
        raise ValueError(f"score: {n} texts but {len(references)} references"
                         + ("" if rows is None else f" and {len(rows)} rows"))
    if len({r.name for r in rewards}) != len(rewards):
        raise ValueError("score: two rewards share a name; build the list with resolve()")
    rows = rows if rows is not None else [None] * n
    total, columns = [0.0] * n, {}
    for r in rewards:
        col = []
        for i, v in enumerate(_values(r, texts, references, rows)):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"reward {r.name!r} returned {v!r} on completion {i}; a reward returns a float") from None
            if not math.isfinite(v):
                raise ValueError(f"reward {r.name!r} returned {v} on completion {i}; rewards must be finite")
            col.append(v)
            total[i] += r.weight * v
        columns[r.name] = col
    return total, columns


def check_columns(rewards, columns):
    """ValueError when a resolved reward needs a dataset column that `columns` (a row's keys) lacks."""
    for r in rewards:
        name = next((n for n, f in REWARDS.items() if f is r.fn), None)
        if name in NEEDS and not set(NEEDS[name]) & set(columns):
            raise ValueError(f"reward {r.name!r} needs a {' or '.join(NEEDS[name])} column, and the dataset has "
                             f"{', '.join(sorted(columns))}: use a dataset with tests (e.g. mbpp) or drop the reward")


def catalogue():
    """One line per registered reward and alias: name, what it measures, range, extra needed."""
    lines = []
    for name in sorted(REWARDS):
        low, high, extra = INFO[name]
        what = (inspect.getdoc(REWARDS[name]) or "").split("\n")[0]
        lines.append(f"{name:<26} {what:<90} [{low:g}, {high:g}]  {extra or '-'}")
    lines += [f"{a:<26} alias of {n}" for a, n in sorted(ALIASES.items())]
    lines.append(f"{'custom':<26} your callable f(text, reference=None, **kwargs) -> float, as params.reward_function")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] != ["list"]:
        sys.exit("usage: python rewards.py list")
    print(catalogue())
