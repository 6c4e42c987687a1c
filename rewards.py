"""
Rewards: score decoded completions against their references.

A reward is a plain function `f(text, reference=None, **kwargs) -> float`: `text` is one decoded completion,
`reference` its dataset answer (or None), and kwargs carry the reward's own params and the other columns of the row
(`prompt`, `test_list`, `context`, `instruction`, ...), so every reward takes `**kwargs` and ignores what it does not
use. A registered reward's named params come from the config only, never from a row column of the same name. This
file holds resolve, score, check_columns, `python rewards.py list` (the catalogue: name, what it measures, range,
extra needed) and the math and length rewards; the other families register theirs when imported here:
rewards_text.py (text heuristics), rewards_models.py (reference metrics, classifier and encoder models) and
rewards_code.py (static checks, and runs in sandbox.py, never in this process).

Config forms (give one, not both):

    rewards=[{"type": "math_correctness", "weight": 1.0},
             {"type": "length", "weight": 0.1, "params": {"max_length": 300}},
             {"type": "custom", "params": {"reward_function": "my_module:my_reward"}}]
    reward_functions=["math_correctness", "length"], reward_function_weights=[1.0, 0.1]

A "type" or a reward_functions entry is a registered name, an alias (math, code), "custom" with
params.reward_function (a callable or a "module:function" string; its other params go to it), or a callable of the
same shape; a dict entry may add "name" to label its metrics column. resolve() turns either form into a list of
Reward and checks names, weights and params once, up front, loading the extras and models they need, so a bad config
stops the run before its first step; score() runs them over a batch, through a reward's batched path when it has
one. A reward that raises or returns a non-finite value stops score() with an error naming it; one that can fail on
bad completions (running generated code, say) catches that itself and returns its low score.

To add a reward, write it in the file of its family and register it (registry.py):

    @register("my_reward", check=None, batch=None, low=0.0, high=1.0, extra=None, needs=())
    def my_reward(text, reference=None, scale=1.0, **kwargs):
        '''One line: what it measures (shown by `list`).'''
        return scale * float(text.strip() == reference)

check(**params) raises ValueError on bad params or a missing extra or model; batch(texts, references, rows, **params)
scores a whole batch; [low, high] is its range and extra what it needs, for `list`; needs: dataset columns of which
every row must have one.
"""
import bisect
import functools
import inspect
import math
import re
import sys
import threading
from collections.abc import Mapping
from fractions import Fraction
from typing import Callable, NamedTuple

import registry
import rewards_code
import rewards_models
import rewards_text
from common import callable_from, did_you_mean, warn_once
from registry import is_number, register

FAMILIES = (rewards_text, rewards_models, rewards_code)  # importing a family registers its rewards
ALIASES = {"math": "math_reasoning", "code": "code_quality"}  # another name -> registered name


# ---------------------------------------------------------------------------- configuration and scoring

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
        raise ValueError(f"rewards[{i}] must be a dict like {{'type': 'length', 'weight': 0.1, 'params': {{...}}}}, "
                         f"got {e!r}")
    for k in e:
        if k not in _ENTRY_KEYS:
            raise ValueError(f"rewards[{i}] has unknown key {k!r}{did_you_mean(k, _ENTRY_KEYS)}; "
                             f"accepted keys: {', '.join(_ENTRY_KEYS)}")
    if "type" not in e:
        raise ValueError(f"rewards[{i}] needs a 'type': a reward name or a callable")
    params = e.get("params") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rewards[{i}] params must be a dict, got {params!r}")
    return e["type"], e.get("weight", 1.0), dict(params), e.get("name")


def _registered(fn):
    """The name fn is registered under, or None."""
    return next((s.name for s in registry.SPECS.values() if s.fn is fn), None)


def _lookup(kind):
    """(fn, name, registered) for a reward name or callable."""
    if callable(kind):
        name = _registered(kind)
        return kind, name or getattr(kind, "__name__", type(kind).__name__), name is not None
    if not isinstance(kind, str):
        raise ValueError(f"a reward is a name, 'custom' or a callable, got {kind!r}")
    name = ALIASES.get(kind, kind)
    if name not in registry.SPECS:
        raise ValueError(f"unknown reward {kind!r}{did_you_mean(kind, [*registry.SPECS, *ALIASES, 'custom'])}; "
                         "`python rewards.py list` shows the catalogue")
    return registry.SPECS[name].fn, name, True


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
                raise ValueError(f"reward {name!r} has no param {k!r}{did_you_mean(k, accepted)}; "
                                 f"accepted: {', '.join(accepted) or 'none'}")
        if registry.SPECS[name].check is not None:
            registry.SPECS[name].check(**params)
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
            kind = callable_from(params.pop("reward_function", None), "a custom reward's params.reward_function")
        fn, name, registered = _lookup(kind)
        if registered and device is not None and "device" in _params(fn) and "device" not in params:
            params["device"] = str(device)
        if not is_number(weight):
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
    name = _registered(r.fn)
    params = _params(r.fn) if name else set()  # a registered reward's params come from the config alone
    kws = [_columns(r.fn, row, params | set(r.params)) for row in rows]
    batch = registry.SPECS[name].batch if name else None
    if batch is not None:
        try:
            values = list(batch(texts, references, kws, **r.params))
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
                raise ValueError(f"reward {r.name!r} returned {v!r} on completion {i}; "
                                 "a reward returns a float") from None
            if not math.isfinite(v):
                raise ValueError(f"reward {r.name!r} returned {v} on completion {i}; rewards must be finite")
            col.append(v)
            total[i] += r.weight * v
        columns[r.name] = col
    return total, columns


def check_columns(rewards, columns):
    """Warn, once per reward, when a reward needs a dataset column that `columns` (a row's keys) lacks: it scores
    0.0 on those rows (AlignTune runs it too); ValueError when that holds for every reward: nothing would be learnt."""
    blind = []
    for r in rewards:
        needs = registry.SPECS[name].needs if (name := _registered(r.fn)) else ()
        if needs and not set(needs) & set(columns):
            blind.append(f"reward {r.name!r} needs a {' or '.join(needs)} column, and the dataset has "
                         f"{', '.join(sorted(columns)) or 'no columns'}")
    if blind and len(blind) == len(rewards):
        raise ValueError(f"{'; '.join(blind)}: every reward would score 0.0 on every row; use a dataset with tests "
                         "(e.g. mbpp) or a reward that fits the data (e.g. math_correctness)")
    for line in blind:
        warn_once(f"{line}: it scores 0.0 on every row without tests, so it adds nothing to the advantages; the "
                  "other rewards carry the signal")


def catalogue():
    """One line per registered reward and alias: name, what it measures, range, extra needed."""
    lines = []
    for name, s in sorted(registry.SPECS.items()):
        what = (inspect.getdoc(s.fn) or "").split("\n")[0]
        lines.append(f"{name:<26} {what:<90} [{s.low:g}, {s.high:g}]  {s.extra or '-'}")
    lines += [f"{a:<26} alias of {n}" for a, n in sorted(ALIASES.items())]
    lines.append(f"{'custom':<26} your callable f(text, reference=None, **kwargs) -> float, as params.reward_function")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- math answers

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
    if is_number(x):
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
                         f"{did_you_mean(backend, _BACKENDS)}")
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
    if not isinstance(pred, str) or not (is_number(ref) or isinstance(ref, str)):
        return False
    gold = str(ref) if is_number(ref) else _final(ref) or _unwrap(ref.strip())
    answer = _final(pred)
    b = Fraction(ref) if is_number(ref) else _whole(gold)
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


def _check_math(tolerance=1e-6, backend="auto", reward="math_correctness"):
    if not is_number(tolerance) or tolerance < 0:
        raise ValueError(f"{reward}: tolerance must be a number >= 0, got {tolerance!r}")
    _backend(backend, reward)


@register("math_correctness", check=_check_math, extra="optional: math-verify")
def math_correctness(text, reference=None, tolerance=1e-6, backend="auto", **kwargs):
    """1.0 when the final answer equals the reference (symbolically with math-verify), else 0.0.

    0.0 without a reference. See math_equal: tolerance applies to plain numbers; backend is "auto" (math-verify for
    symbolic answers when installed: pip install math-verify), "math_verify" (required) or "numeric".
    """
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

    Its structure is the mean of the enabled parts. reasoning (check_reasoning): (min(E, 3) / 3 + min(S, 2) / 2) / 2, E
    the distinct lines or sentences holding an equation ("48/2 = 24"), S the distinct step words (first, then, so,
    therefore, since, step 1, ... on word boundaries). format (check_format): (1 if the final answer is marked with
    ####, \\boxed or "the answer is", else 0, plus the share of distinct non-empty lines) / 2. With a reference and
    check_correctness: correct * (1 + structure) / 2, so a correct answer scores 0.5 to 1 by its shown work and a wrong
    one 0 (AlignTune averages the three, which pays a wrong answer for its steps); correct is math_correctness with
    tolerance and backend. Without a reference, or with check_correctness=False: structure alone.
    """
    parts = [f(text) for f, on in ((_reasoning, check_reasoning), (_layout, check_format)) if on]
    structure = sum(parts) / len(parts) if parts else 0.0
    if reference is None or not check_correctness:
        return structure
    correct = float(math_equal(text, reference, tolerance, backend))
    return correct * (1 + structure) / 2 if parts else correct


# ---------------------------------------------------------------------------- length

_LENGTH_UNITS = ("words", "chars")


def _check_length(min_length=None, max_length=None, target_length=None, unit="words"):
    for name, v, least in (("min_length", min_length, 0), ("max_length", max_length, 1),
                           ("target_length", target_length, 1)):
        if v is not None and (not is_number(v) or v < least):
            raise ValueError(f"length: {name} must be a number >= {least}, got {v!r}")
    if min_length is not None and max_length is not None and min_length > max_length:
        raise ValueError(f"length: min_length ({min_length}) is greater than max_length ({max_length})")
    if target_length is not None and (min_length is not None or max_length is not None):
        raise ValueError("length: give target_length or min_length/max_length, not both")
    if unit not in _LENGTH_UNITS:
        raise ValueError(f"length: unit must be one of {_LENGTH_UNITS}, got {unit!r}"
                         f"{did_you_mean(unit, _LENGTH_UNITS)}")


@register("length", check=_check_length)
def length(text, reference=None, min_length=None, max_length=None, target_length=None, unit="words", **kwargs):
    """Closeness of the word (or character) count to a target or a range.

    n counts whitespace-separated words (unit="words") or characters (unit="chars"). With target_length t:
    1 - |n - t| / t, floored at 0. With min_length and/or max_length: 1 inside the range, n / min_length below it,
    1 - (n - max_length) / max_length above it (0 from twice max_length on). With no length given: the range [10, 500].
    """
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


def _check_brevity(ideal_length=100, max_length=300):
    for name, v in (("ideal_length", ideal_length), ("max_length", max_length)):
        if not is_number(v) or v < 1:
            raise ValueError(f"brevity: {name} must be a number >= 1, got {v!r}")
    if ideal_length >= max_length:
        raise ValueError(f"brevity: ideal_length ({ideal_length}) must be below max_length ({max_length})")


@register("brevity", check=_check_brevity)
def brevity(text, reference=None, ideal_length=100, max_length=300, **kwargs):
    """Word count at or under an ideal length, decaying past it.

    n counts whitespace-separated words: 1 up to ideal_length (default 100), then linearly down to 0.5 at max_length
    (default 300), then 0.5 - (n - max_length) / max_length, floored at 0 (0 from 1.5 x max_length on). 0.0 for empty
    text.
    """
    n = len(text.split())
    if n == 0:
        return 0.0
    if n <= ideal_length:
        return 1.0
    if n <= max_length:
        return 1.0 - 0.5 * (n - ideal_length) / (max_length - ideal_length)
    return max(0.0, 0.5 - (n - max_length) / max_length)


if __name__ == "__main__":
    if sys.argv[1:] != ["list"]:
        sys.exit("usage: python rewards.py list")
    print(catalogue())
