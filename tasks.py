"""Known datasets and the offline toy task: what data.py needs to know about them.

Columns named like a prompt or a reference (PROMPT_ALIASES, REFERENCE_ALIASES) are mapped to those roles
when no mapping names them. A preset (looked up by the dataset's name, 'openai/gsm8k' -> gsm8k, or recognised by
the shape of local rows, preset_by_shape) gives a dataset's config name, the columns it needs, its column
mapping, a row builder (MBPP's prompt) and how to extract the reference (GSM8K's number after '####', MATH's last
\\boxed{}). toy_task writes GSM8K-style word problems, so the demo and the tests run without the Hub.
"""
import ast
import builtins
import random
import re

PROMPT_ALIASES = ("prompt", "query", "instruction", "question", "input")  # auto-detected, the first match wins
REFERENCE_ALIASES = ("reference", "answer", "response", "solution", "completion")
PROMPT_LIKE = ("text", "problem", "task", "description", "content")  # suggested for a mapping, in this order
NOT_PROMPT = ("answer", "reference", "response", "solution", "completion", "output", "target", "label", "code",
              "test", "id")  # words that start no column name suggested as the prompt


def prompt_guess(row):
    """The column of `row` that looks like the prompt: the first of PROMPT_LIKE, else the longest string column
    whose name is not reference-, code- or test-like; None when there is none."""
    plain = [c for c, v in row.items() if isinstance(v, str)
             and not any(w.startswith(NOT_PROMPT) for w in re.split(r"[\W_]+", c.lower()))]
    return next((c for c in PROMPT_LIKE if c in row), None) or max(plain, key=lambda c: len(row[c]), default=None)


def resolve_mapping(row, column_mapping):
    """{source column: target} for rows like `row`: the given mapping, then auto-detected prompt/reference columns."""
    mapping, columns = dict(column_mapping or {}), sorted(row)
    missing = [c for c in mapping if c not in row]
    if missing:
        raise ValueError(f"column(s) {missing} not found; the dataset has {columns}: "
                         "set column_mapping={source column: 'prompt' | 'reference'} to match")
    for role, aliases in (("prompt", PROMPT_ALIASES), ("reference", REFERENCE_ALIASES)):
        found = [c for c in aliases if c in row and c not in mapping]
        if role not in mapping.values() and found:
            mapping[found[0]] = role
    if "prompt" not in mapping.values():
        guess = prompt_guess({c: v for c, v in row.items() if c not in mapping})
        raise ValueError(f"no prompt column among {columns}; name it with column_mapping, e.g. "
                         + (f"column_mapping={{{guess!r}: 'prompt'}}" if guess else
                            "column_mapping={'<the column with the task>': 'prompt'}"))
    return mapping


def extract_gsm8k(text):
    """The answer after the last '####', commas dropped ('#### 1,234' -> '1234'); None without a marker."""
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else None


def extract_boxed(text):
    """The content of the last \\boxed{...}, nested braces balanced; None if absent or unbalanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def mbpp_function(test, imports=""):
    """The function an MBPP assert tests: the first plain name it calls that is not a builtin nor imported
    ('assert set(f(1)) == {2}' -> 'f'); None when there is none or the test does not parse."""
    try:
        tree, known = ast.parse(test), set(dir(builtins))
        for node in ast.walk(ast.parse(imports or "")):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                known.update((a.asname or a.name).split(".")[0] for a in node.names)
    except SyntaxError:
        return None
    calls = sorted((n.func.col_offset, n.func.id) for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id not in known)
    return calls[0][1] if calls else None


def mbpp_row(row):
    """An MBPP row ("full" or "sanitized" config) with a prompt naming the function and showing its first test."""
    row = dict(row)
    task, tests = row.pop("text", None) or row.get("prompt") or "", list(row.get("test_list") or [])
    imports = "\n".join([row.get("test_setup_code") or "", *(row.get("test_imports") or [])])
    name = mbpp_function(tests[0], imports) if tests else None
    row["prompt"] = (f"{task.strip()}\n"
                     + (f"Write a Python function named `{name}`. Your code should pass this test:\n{tests[0]}\n"
                        if name else "")
                     + "Give the complete code in one ```python code block.")
    return row


GSM8K = {"needs": ("question", "answer"), "config_name": "main",
         "columns": {"question": "prompt", "answer": "reference"}, "extract": {"answer": extract_gsm8k}}
MBPP = {"needs": ("test_list", "code"), "row": mbpp_row,  # test_list and the other columns reach the rewards
        "columns": {"prompt": "prompt", "code": "reference"}}
MATH = {"needs": ("problem", "solution"), "columns": {"problem": "prompt", "solution": "reference"},
        "extract": {"solution": extract_boxed}}
PRESETS = {"gsm8k": GSM8K, "toy": GSM8K, "mbpp": MBPP, "math": MATH, "competition_math": MATH,
           "hendrycks_math": MATH}


def preset_for(name):
    """The preset of a dataset, looked up by its name's basename ('openai/gsm8k' -> gsm8k); None if none."""
    return PRESETS.get(name.rsplit("/", 1)[-1].lower())


SHAPES = {"mbpp": (MBPP, {"code": "", "test_list": ""}),  # full (text) or sanitized (prompt)
          "gsm8k": (GSM8K, {"question": "", "answer": "####"}),
          "math": (MATH, {"problem": "", "solution": "\\boxed{"})}  # name: (preset, {column: text it always holds})


def preset_by_shape(rows):
    """(name, preset) of the first shape in SHAPES that every row of `rows` (a few first rows) has: its columns,
    and GSM8K's '####' in the answer or MATH's \\boxed{} in the solution; None for none."""
    for name, (preset, marks) in SHAPES.items():
        if rows and all(c in r and m in str(r[c] or "") for r in rows for c, m in marks.items()):
            return name, preset
    return None


# ----------------------------------------------------------------------------- the toy task

NAMES = ["Tom", "Ana", "Ravi", "Mei", "Lena", "Omar", "Sara", "Ben", "Yuki", "Ivan"]
OBJECTS = ["apples", "pencils", "marbles", "cookies", "stickers", "books", "shells", "coins"]
TEMPLATES = {
    "+": ["{n} has {a} {o}. {n} buys {b} more. How many {o} does {n} have now?",
          "There are {a} {o} in a box. {n} puts in {b} more. How many {o} are in the box now?"],
    "-": ["{n} has {a} {o}. {n} gives {b} to a friend. How many {o} does {n} have left?",
          "A basket holds {a} {o}. {n} takes out {b}. How many {o} are left in the basket?"],
    "*": ["{n} has {a} bags with {b} {o} in each bag. How many {o} does {n} have in total?",
          "{n} buys {a} packs of {b} {o}. How many {o} does {n} buy?"],
}


def toy_task(n, seed=0, max_value=20, ops="+-"):
    """n GSM8K-style word problems {"question", "answer": "a op b = c\\n#### c"}, deterministic per seed."""
    if not ops or set(ops) - set(TEMPLATES):
        raise ValueError(f"ops={ops!r}: use a non-empty string of the operators {''.join(TEMPLATES)}")
    rng, rows = random.Random(seed), []
    for _ in range(n):
        op = rng.choice(ops)
        top = min(max_value, 12) if op == "*" else max_value
        a, b = rng.randint(0, top), rng.randint(0, top)
        if op == "-" and b > a:
            a, b = b, a  # never negative
        c = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = rng.choice(TEMPLATES[op]).format(n=rng.choice(NAMES), o=rng.choice(OBJECTS), a=a, b=b)
        rows.append({"question": question, "answer": f"{a} {op} {b} = {c}\n#### {c}"})
    return rows
