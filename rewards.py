"""
Rewards: score decoded completions against their references.

A reward is a plain function `f(text, reference=None, **kwargs) -> float`. `text` is one decoded
completion, `reference` its dataset answer (or None), and kwargs carry the reward's own params
together with the other columns of the dataset row (`test_list`, `context`, ...), so every reward
takes `**kwargs` and ignores what it does not use. A registered reward's named params come from the
config only: a row column of the same name never reaches them.

Two config forms say which rewards to use (give one, not both):

    rewards=[{"type": "math_correctness", "weight": 1.0},
             {"type": "length", "weight": 0.1, "params": {"max_length": 300}}]
    reward_functions=["math_correctness", "length"], reward_function_weights=[1.0, 0.1]

A "type" or a reward_functions entry is a registered name or a callable of the same shape; a dict
entry may add "name" to label its metrics column. resolve() turns either form into a list of Reward
and checks names, weights and params up front; score() runs them over a batch.

A reward that raises or returns a non-finite value stops score() with an error naming it; nothing is
swallowed. A reward that can fail on bad completions (running generated code, say) catches that
itself and returns its low score.

To add a reward, write the function and decorate it:

    @register("my_reward")
    def my_reward(text, reference=None, scale=1.0, **kwargs):
        return scale * float(text.strip() == reference)

`register(name, check=fn)` may also give a function of the params alone that raises ValueError,
so that resolve() rejects bad params before training starts.
"""

import bisect
import difflib
import inspect
import math
import numbers
import re
from collections.abc import Mapping
from fractions import Fraction
from typing import Callable, NamedTuple

REWARDS = {}  # name -> reward function
CHECKS = {}  # name -> function(**params) that raises ValueError on bad params (or a missing extra or model)
BATCHED = {}  # name -> function(texts, references, rows, **params) -> list of floats
INFO = {}  # name -> (low, high, extra): the range of its values and the pip extra it needs (or None)
ALIASES = {"math": "math_reasoning", "code": "code_quality"}  # another name -> registered name


def register(name, check=None, batch=None, low=0.0, high=1.0, extra=None):
    """
    Decorator: add a reward function to REWARDS under `name`. `check(**params)` raises ValueError on bad
    params, or on a missing extra or model, so that resolve() stops before training; `batch(texts,
    references, rows, **params)` scores a whole batch at once (rows: one dict of columns per text);
    [low, high] is the range of its values and `extra` the pip install line it needs, for `list`.
    """
    def deco(fn):
        REWARDS[name] = fn
        INFO[name] = (low, high, extra)
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


def math_equal(pred, ref, tolerance=1e-6):
    """
    True when the answer in `pred` equals the one in `ref` within `tolerance` (relative and
    absolute, like math.isclose). `pred` is read with extract_answer. `ref` may be a number, a
    number string ("72", "3/4", "\\frac{1}{2}"), or a raw solution with a "####" or \\boxed marker;
    a reference that is neither ("\\sqrt{2}") matches nothing.
    """
    a, b = _value(pred, False), _value(ref, True)
    if a is None or b is None:
        return False
    tol = Fraction(tolerance)
    return abs(a - b) <= max(tol * max(abs(a), abs(b)), tol)


# -----------------------------------------------------------------------------
# rewards


def _check_math(tolerance=1e-6):
    if not _is_number(tolerance) or tolerance < 0:
        raise ValueError(f"math_correctness: tolerance must be a number >= 0, got {tolerance!r}")


@register("math_correctness", check=_check_math)
def math_correctness(text, reference=None, tolerance=1e-6, **kwargs):
    """1.0 if the final answer in text equals the reference (see math_equal), else 0.0; 0.0 without a reference."""
    _check_math(tolerance)
    return float(math_equal(text, reference, tolerance))


_LENGTH_UNITS = ("words", "chars")


def _check_length(min_length=None, max_length=None, target_length=None, unit="words"):
    for name, v, least in (("min_length", min_length, 0), ("max_length", max_length, 1), ("target_length", target_length, 1)):
        if v is not None and (not _is_number(v) or v < least):
            raise ValueError(f"length: {name} must be a number >= {least}, got {v!r}")
    if min_length is not None and max_length is not None and min_length > max_length:
        raise ValueError(f"length: min_length ({min_length}) is greater than max_length ({max_length})")
    if target_length is not None and (min_length is not None or max_length is not None):
        raise ValueError("length: give target_length or min_length/max_length, not both")
    if unit not in _LENGTH_UNITS:
        raise ValueError(f"length: unit must be one of {_LENGTH_UNITS}, got {unit!r}{_did_you_mean(unit, _LENGTH_UNITS)}")


@register("length", check=_check_length)
def length(text, reference=None, min_length=None, max_length=None, target_length=None, unit="words", **kwargs):
    """
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

# (text heuristics go here)


# -----------------------------------------------------------------------------
# reference metrics: bleu, rouge, meteor

# (reference metrics go here)


# -----------------------------------------------------------------------------
# model rewards: bertscore, semantic_similarity, safety, toxicity

# (model rewards go here)


# -----------------------------------------------------------------------------
# code rewards: syntax, quality, completeness; execution in a sandboxed process

import ast
import functools
import hashlib
import io
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor

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
    """
    Share of the completion's Python blocks (see extract_code) that compile, in [0, 1]; 0.0 with no code.
    A block must hold at least one statement, and compile-time errors (a `return` outside a function) count.
    """
    return _compiled(text)[0]


@register("code_quality", check=_check_quality)
def code_quality(text, reference=None, check_syntax=True, check_style=True, check_comments=True, check_efficiency=True,
                 language="python", **kwargs):
    """
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
    """
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
# installs the audit hook and runs the code; it reports "done" and "pass <i>" to the parent, each signed with the
# job's key. Everything it uses once user code has run is bound beforehand (default args, closures), so user code
# cannot patch it through builtins or modules.
_RUNNER = r'''
import hashlib, io, json, os, resource, sys


def guard(tmp):
    """The audit hook. Writes go to tmp only (and /dev/null); nothing under /proc is opened."""
    deny = frozenset((
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.kill", "os.killpg",
        "signal.pthread_kill", "os.chdir", "os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr",
        "os.chflags", "os.lchflags", "os.lchmod", "os.symlink", "os.link", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.addaudithook", "cpython.PyInterpreterState_New", "resource.setrlimit", "resource.prlimit",
        "code.__new__", "pty.spawn"))
    modules = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_xxsubinterpreters",
                         "_xxinterpchannels", "_testcapi", "_testinternalcapi", "_sqlite3", "_dbm", "_gdbm", "syslog"))
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

    def is_dir(r, stat=os.stat, OSError=OSError):
        try:
            return stat(r).st_mode & 0o170000 == 0o040000
        except OSError:
            return False

    def hook(event, args, deny=deny, modules=modules, frames=frames, moves=moves, writes=writes, text=text,
             resolve=resolve, inside=inside, is_dir=is_dir, type=type, int=int, ImportError=ImportError,
             PermissionError=PermissionError, ValueError=ValueError):
        if event in deny or event.startswith(("socket.", "subprocess.")):
            raise PermissionError("sandbox: " + event + " is not allowed")
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
            if event == "open" and (type(args[2]) is not int or args[2] & writes or is_dir(r)) and not inside(args[0]):
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


def run(job, report, exec=exec, compile=compile, BaseException=BaseException, enumerate=enumerate, any=any,
        program=program, lines=lines):
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
            ns = {"__name__": "solution"}
            exec(code, ns)
            exec(compile(job["setup"], "<setup>", "exec", dont_inherit=True), ns)
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

    sys.addaudithook(guard(job["tmp"]))
    run(job, report)
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


def _command(tmp, namespaces, memory_mb):
    python = [sys.executable, "-I", "-B", "-c", _RUNNER]
    if not namespaces:
        return python
    unshare, mount, setpriv, sh = _tools()
    return [unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount", "--mount-proc",
            "--kill-child", sh, "-c", _NS_SETUP, "sh", tmp, mount, str(memory_mb),
            setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", *python]


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


def _sandbox(job, timeout, memory_mb, namespaces):
    """
    Run one job in a fresh process: (whether the program ran to completion, how many of job["tests"] passed).

    What it does: the code runs only in a child `python -I -B` (never in this process), with a minimal environment
    (PATH, LANG, and HOME = TMPDIR = its working directory, a private temporary directory deleted afterwards), so none
    of the trainer's environment variables reach it. Limits: `timeout` seconds of wall clock for the whole run, after
    which its process group is killed; RLIMIT_CPU ceil(timeout) + 1 s, RLIMIT_AS memory_mb, RLIMIT_FSIZE 16 MB,
    RLIMIT_NOFILE 64, RLIMIT_NPROC 0 (no threads or processes), RLIMIT_CORE 0; at most 1 MB of its output is read.
    With `namespaces` it runs in new user, pid, mount and network namespaces (unshare): no network (its own loopback
    is down), the trainer is invisible and cannot be signalled, every process in it dies with it, every mount is
    read-only but its working directory, a tmpfs of memory_mb, and it holds no capabilities (setpriv, no_new_privs).
    In both modes an audit hook, installed before the code runs, refuses: sockets and name lookups; subprocess,
    os.system, exec, fork, posix_spawn; os.kill, killpg, pthread_kill; ctypes, cffi and other native-call modules;
    subinterpreters; opening anything under /proc; writing, creating, removing or renaming outside its directory
    (and /dev/null); chdir, chmod, chown, utime, xattrs, links; setrlimit; more audit hooks; and the ways to the
    runner's memory: gc.get_objects/get_referrers/get_referents, sys._getframe/_current_frames, the frames of
    tracebacks and generators, settrace/setprofile, code.__new__ and replacing a function's __code__. A pass counts
    only when signed with a MAC keyed by a random key the child reads from stdin, so printing markers, or replaying
    and hijacking its report pipe, forges nothing; sys.exit and os._exit only end the run.

    What it does NOT stop: native code (an installed C extension, a hand-made code object from marshal.loads, an
    interpreter bug) can do whatever its process may do, including reading the key and forging passes: the audit hook
    only sees Python-level calls. The code runs as the trainer's user (root if the trainer is root, which RLIMIT_NPROC
    exempts), so it can read whatever that user can read, and through native code reach Unix sockets in the file
    system. Timing and cache side channels. Tests as weak as their asserts: an object whose __eq__ always returns True
    passes `assert f(x) == y`. Without namespaces (sandbox="process", or "auto" where they do not work) the audit hook
    is the only guard, and more is open: signal.pidfd_send_signal can signal any process of the user (the trainer
    included), os.mkfifo and os.mknod create nodes outside its directory, the disk fills at 16 MB a file, and native
    code has the network.
    """
    key = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="nmgrpo-code-", ignore_cleanup_errors=True) as tmp:
        tmp = os.path.realpath(tmp)
        payload = json.dumps({**job, "key": key.hex(), "tmp": tmp, "cpu": math.ceil(timeout) + 1,
                              "memory": memory_mb << 20}).encode()
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(_command(tmp, namespaces, memory_mb), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=tmp, env=env, start_new_session=True)
        try:
            try:
                proc.stdin.write(payload)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            signed = set(_read(proc.stdout, deadline).split())
        finally:
            _kill(proc)
    passed = sum(_sign(key, f"pass {i}") in signed for i in range(len(job.get("tests", ()))))
    return _sign(key, "done") in signed, passed


@functools.lru_cache(maxsize=None)
def _namespaces():
    """Whether the namespace sandbox works here: probed once by running an empty program in it."""
    return _tools() is not None and _sandbox({"mode": "run", "code": "", "stdin": ""}, 10.0, 256, True)[0]


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
    available = sandbox == "process" or _namespaces()  # probed once, here at start-up for "auto" as well
    if sandbox == "namespace" and not available:
        raise ValueError("code sandbox: sandbox='namespace' needs working unprivileged user namespaces and "
                         "util-linux (unshare, mount, setpriv), which this machine lacks; use 'auto' or 'process'")


def _run_all(jobs, timeout, memory_mb, max_workers, sandbox):
    """(done, passed) of each job (None: nothing to run), in parallel, each in its own sandboxed process."""
    _check_sandbox(timeout, memory_mb, max_workers, sandbox)
    namespaces = sandbox != "process" and _namespaces()

    def one(job):
        return (False, 0) if job is None else _sandbox(job, timeout, memory_mb, namespaces)

    with ThreadPoolExecutor(max(1, min(len(jobs), max_workers or os.cpu_count() or 1))) as pool:
        return list(pool.map(one, jobs))


def _tests(row):
    """The row's tests: MBPP asserts (test_list), and test_cases of asserts or {"input", "expected_output"}."""
    tests = []
    for t in [*_as_list(row.get("test_list") or []), *_as_list(row.get("test_cases") or [])]:
        out = t.get("expected_output", t.get("output")) if isinstance(t, Mapping) else None
        if isinstance(t, str):
            tests.append({"assert": t})
        elif isinstance(out, str) and isinstance(t.get("input"), str):
            tests.append({"input": t["input"], "output": out})
        else:
            raise ValueError(f"code tests are assert strings or stdin/stdout cases {{'input': str, "
                             f"'expected_output' (or 'output'): str}}, got {t!r}")
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


@register("code_execution", check=_check_sandbox, batch=_execution_batch)
def code_execution(text, reference=None, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto", **kwargs):
    """
    1.0 if the completion's code (see extract_code) runs to completion without an error, else 0.0 (no code, an
    exception, sys.exit or os._exit, a limit hit). It runs as __main__ with the row's first stdin case as its input
    (else an empty one); tests are not run (that is code_correctness, unlike AlignTune's code_execution, which scores
    tests when it has them). timeout: wall-clock seconds for the run; memory_mb: its address-space limit (and the
    size of its tmpfs with namespaces); max_workers: parallel runs in a batch (default os.cpu_count()); sandbox:
    "auto" (namespaces where this machine allows them), "namespace" (required) or "process" (audit hook and rlimits
    only). See _sandbox for what the sandbox stops and what it does not.
    """
    return _execution_batch([text], [reference], [kwargs], timeout, memory_mb, max_workers, sandbox)[0]


@register("code_correctness", check=_check_sandbox, batch=_correctness_batch)
def code_correctness(text, reference=None, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto", **kwargs):
    """
    Fraction of the row's tests the completion's code (see extract_code) passes, in [0, 1]. Tests come from the row:
    test_list (MBPP assert strings, with test_imports and test_setup_code run after the code) and test_cases (assert
    strings, or {"input", "expected_output" (or "output")} cases: the code runs as __main__ on that stdin, and its
    stdout must match up to trailing whitespace; AlignTune instead calls the first function with "input"). Asserts
    run in the code's namespace, loaded once (as module "solution"): code that fails to load passes none of them.
    A row without either column is an error; empty tests score 0.0. One run holds all of a completion's tests,
    under the params of code_execution; tests passed before a timeout count.
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


def _lookup(kind):
    """(fn, name, registered) for a reward name or callable."""
    if callable(kind):
        name = next((n for n, f in REWARDS.items() if f is kind), None)
        return kind, name or getattr(kind, "__name__", type(kind).__name__), name is not None
    if not isinstance(kind, str):
        raise ValueError(f"a reward is a name or a callable, got {kind!r}")
    name = ALIASES.get(kind, kind)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {kind!r}{_did_you_mean(kind, [*REWARDS, *ALIASES])}; "
                         f"known rewards: {', '.join(sorted(REWARDS))}")
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
