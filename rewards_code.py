"""Code rewards: static checks of the completion's Python (syntax, quality, completeness) and runs in the sandbox."""
import ast
import io
import json
import re
import tokenize
from collections.abc import Mapping

import sandbox as sandbox_lib
from registry import register

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

    The blocks are those of extract_code; 0.0 with no code. A block must hold at least one statement, and compile-time
    errors (a `return` outside a function) count.
    """
    return _compiled(text)[0]


@register("code_quality", check=_check_quality)
def code_quality(text, reference=None, check_syntax=True, check_style=True, check_comments=True, check_efficiency=True,
                 language="python", **kwargs):
    """Static quality of the code: syntax, PEP 8 style, docstrings, loop nesting.

    The mean of the enabled checks over the Python blocks that compile (0.0 when none does); nothing is run. syntax:
    code_syntax. style: the mean of the share of PEP 8 names (snake_case functions, arguments and variables, UPPER_CASE
    constants, CapWords classes; 1 with no names), the share of lines of at most 100 characters, no bare `except:` (1/0)
    and no `import *` (1/0). comments: the share of functions and classes with a docstring; with neither, 1 if the code
    has a comment or a module docstring. efficiency: 1 up to two nested loops (a comprehension counts one per `for`
    clause), 2 / depth deeper. language: "python" only.
    """
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

    0.0 when no Python block compiles, else the mean of three checks over the blocks that compile: it defines a function
    or class (1/0); the share of functions whose body is more than a stub (only pass, `...`, raise NotImplementedError
    or a docstring; 1 with no functions); no TODO, FIXME or XXX comment and no `...` statement (1/0). Nothing is run.
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


def _as_list(x):
    return [x] if isinstance(x, (str, Mapping)) or callable(x) else list(x)


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
    return [float(done) for done, _ in sandbox_lib.run_all(jobs, timeout, memory_mb, max_workers, sandbox)]


def _correctness_batch(texts, references, rows, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto"):
    jobs = []
    for text, row in zip(texts, rows):
        row = row or {}
        code, tests = extract_code(text), _tests(row)
        setup = "\n".join([*_as_list(row.get("test_imports") or []), row.get("test_setup_code") or ""])
        jobs.append({"mode": "test", "code": code, "setup": setup, "tests": tests} if code.strip() and tests else None)
    results = sandbox_lib.run_all(jobs, timeout, memory_mb, max_workers, sandbox)
    return [passed / len(job["tests"]) if job else 0.0 for job, (_, passed) in zip(jobs, results)]


@register("code_execution", check=sandbox_lib.check, batch=_execution_batch, extra="Linux")
def code_execution(text, reference=None, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto", **kwargs):
    """1.0 if the code runs to completion in the sandbox without an error.

    0.0 for no code (see extract_code), an exception, sys.exit or os._exit, a limit hit. It runs as __main__ with the
    row's first stdin case as its input (else an empty one); tests are not run (that is code_correctness, unlike
    AlignTune's code_execution, which scores tests when it has them). timeout: wall-clock seconds for the run;
    memory_mb: its address-space limit (and the size of its tmpfs with namespaces); max_workers: parallel runs in a
    batch (default os.cpu_count()); sandbox: "auto" (namespaces where this machine allows them, else "process", with a
    warning), "namespace" (required) or "process" (no namespaces; as uid 65534 for a root trainer). sandbox.run says
    what the sandbox stops and what it does not. Needs Linux (and util-linux with unprivileged user namespaces for
    "namespace").
    """
    return _execution_batch([text], [reference], [kwargs], timeout, memory_mb, max_workers, sandbox)[0]


@register("code_correctness", check=sandbox_lib.check, batch=_correctness_batch, extra="Linux",
          needs=("test_list", "test_cases"))
def code_correctness(text, reference=None, timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto", **kwargs):
    """Share of the row's tests (MBPP asserts, stdin/stdout cases) passed in the sandbox.

    The code is extract_code's. Tests come from the row: test_list (MBPP assert strings, with test_imports and
    test_setup_code run after the code) and test_cases (a list, or its JSON string, of assert strings or {"input",
    "expected_output" (or "output")} cases: the code runs as __main__ on that stdin, and its stdout must match up to
    trailing whitespace; AlignTune instead calls the first function with "input"). A test string that does not parse or
    holds no assert statement is an error; a row without tests scores 0.0 (check_columns warns at start). The code is
    loaded once (as module "solution"), and code that fails to load passes no assert. Asserts see its names, but not
    those that shadow a builtin, and the builtins as they were before it ran, so `def set(...)` or `builtins.sorted =
    ...` cannot change what a test means (a patched module can: see sandbox.run). One run holds all of a completion's
    tests, under the params of code_execution; tests passed before a timeout count.
    """
    return _correctness_batch([text], [reference], [kwargs], timeout, memory_mb, max_workers, sandbox)[0]
