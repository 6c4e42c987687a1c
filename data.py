"""Examples, prompts and the data stream: what the trainer feeds the sampler.

load_examples turns a Hub dataset, a local file or folder, an in-memory list or the offline "toy"
task into lists of {"prompt", "reference", **other columns}; render_prompt applies the chat template;
encode_prompts left-pads token ids; batch_indices is the deterministic, rank-aware shuffled stream.
"""
import ast
import builtins
import importlib
import logging
import os
import random

import torch
from datasets import Dataset, DatasetDict, ReadInstruction, load_dataset, load_from_disk

log = logging.getLogger(__name__)

PROMPT_ALIASES = ("prompt", "query", "instruction", "question", "input")  # auto-detect, first match wins
REFERENCE_ALIASES = ("reference", "answer", "response", "solution", "completion")
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


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


GSM8K = {"needs": ("question", "answer"), "config_name": "main", "columns": {"question": "prompt", "answer": "reference"},
         "extract": {"answer": extract_gsm8k}}
MBPP = {"needs": ("test_list", "code"), "row": mbpp_row, "columns": {"prompt": "prompt", "code": "reference"}}  # test_list etc. reach the rewards
MATH = {"needs": ("problem", "solution"), "columns": {"problem": "prompt", "solution": "reference"}, "extract": {"solution": extract_boxed}}
PRESETS = {"gsm8k": GSM8K, "toy": GSM8K, "mbpp": MBPP, "math": MATH, "competition_math": MATH,
           "hendrycks_math": MATH}


def preset_for(name):
    """The preset of a dataset, looked up by its name's basename ('openai/gsm8k' -> gsm8k); None if none."""
    return PRESETS.get(name.rsplit("/", 1)[-1].lower())


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


# ----------------------------------------------------------------------------- loading

def _split_rows(splits, split):
    """Rows of `split` (HF syntax, e.g. 'train[:10%]') from a dict of in-memory splits (lists or Datasets)."""
    rows = []
    for part in ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in splits.items()}):
        table = splits[part.splitname]
        rows += (table.select(range(part.from_, part.to)).to_list() if isinstance(table, Dataset)
                 else [dict(r) for r in table[part.from_:part.to]])
    return rows


def _load(source, config_name, split, seed, max_samples, cache_dir=None):
    """A Dataset or list of row dicts for one split of `source`."""
    if isinstance(source, (list, tuple)):
        return _split_rows({"train": source}, split)
    if source == "toy":
        return _split_rows({"train": toy_task(max_samples or 2000, seed=seed)}, split)
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in FILE_BUILDERS:
            raise ValueError(f"{source}: unsupported file type {ext!r}; use one of {sorted(FILE_BUILDERS)}")
        return load_dataset(FILE_BUILDERS[ext], data_files=source, split=split)
    if os.path.isdir(source):
        if not any(os.path.exists(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json")):
            return load_dataset(source, split=split)  # a folder of data files
        saved = load_from_disk(source)  # written by save_to_disk
        return _split_rows(dict(saved) if isinstance(saved, DatasetDict) else {"train": saved}, split)
    if os.path.splitext(source)[1].lower() in FILE_BUILDERS or source.startswith(("/", ".", "~")):
        raise ValueError(f"dataset_name={source!r} is not an existing file or folder: check the path, "
                         "or give a Hub name like 'openai/gsm8k'")
    try:
        return load_dataset(source, config_name, split=split, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as e:  # offline, or no such dataset on the Hub
        raise ValueError(f"dataset_name={source!r} could not be loaded ({str(e).splitlines()[0]}): check the "
                         "name, go online, or give a local file or folder") from None


def _resolve_fn(processing_fn):
    """A callable from a callable or a 'module:function' string."""
    if processing_fn is None or callable(processing_fn):
        return processing_fn
    module, _, name = str(processing_fn).partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"processing_fn={processing_fn!r} cannot be imported ({e}); "
                         "give a callable or a 'module:function' string") from None
    if not callable(fn):
        raise ValueError(f"processing_fn={processing_fn!r} is not callable")
    return fn


def _resolve_mapping(columns, column_mapping):
    """{source column: target}: the given mapping, then auto-detected prompt/reference columns."""
    mapping = dict(column_mapping or {})
    missing = [c for c in mapping if c not in columns]
    if missing:
        raise ValueError(f"column(s) {missing} not found; the dataset has {sorted(columns)}: "
                         "set column_mapping={source column: 'prompt' | 'reference'} to match")
    for role, aliases in (("prompt", PROMPT_ALIASES), ("reference", REFERENCE_ALIASES)):
        found = [c for c in aliases if c in columns and c not in mapping]
        if role not in mapping.values() and found:
            mapping[found[0]] = role
    if "prompt" not in mapping.values():
        raise ValueError(f"no prompt column among {sorted(columns)}; name it with column_mapping, "
                         f"e.g. column_mapping={{'{sorted(columns)[0]}': 'prompt'}}")
    return mapping


def _to_examples(rows, column_mapping, extract):
    """Rename mapped columns, extract references, keep every other column untouched."""
    if not rows:
        return []
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"row {bad} is {rows[bad]!r:.200}, not a dict (a processing_fn must return the row)")
    mapping = _resolve_mapping(rows[0].keys(), column_mapping)
    ref_src = next((s for s, d in mapping.items() if d == "reference"), None)
    examples = []
    for i, row in enumerate(rows):
        if any(src not in row for src in mapping):
            raise ValueError(f"row {i} lacks a column of {sorted(mapping)}: it has {sorted(row)}")
        ex = {"prompt": None, "reference": None}
        ex.update({k: v for k, v in row.items() if k not in mapping})
        ex.update({dst: row[src] for src, dst in mapping.items()})
        ref = ex["reference"]
        if ref is not None:
            ex["reference"] = extract[ref_src](str(ref)) if ref_src in extract else str(ref)
        examples.append(ex)
    return examples


def _prompt_key(prompt):
    """Normalised prompt text for overlap checks: messages joined, whitespace collapsed, casefolded."""
    if isinstance(prompt, (list, tuple)):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return " ".join(str(prompt).split()).casefold()


def load_examples(source, *, config_name=None, split="train", eval_split=None, eval_size=0,
                  max_samples=None, column_mapping=None, processing_fn=None, seed=42, cache_dir=None):
    """(train, eval) lists of {"prompt", "reference", **other columns} from one source.

    source: a Hub name, a .json/.jsonl/.csv/.parquet file (one "train" split), a folder (save_to_disk
    or data files), a list of dicts, or "toy" (toy_task of max_samples or 2000 rows, seeded by `seed`).
    Presets (preset_for) give Hub names, "toy", and local folders named like a preset ("mbpp/") that
    hold its columns, their config_name, row builder (MBPP's prompt), column mapping and reference
    extraction; a user column_mapping ({source column: "prompt" | "reference" | new name}) replaces
    the preset's mapping and row builder. Unmapped roles are auto-detected from PROMPT_ALIASES / REFERENCE_ALIASES.
    max_samples keeps the first n rows of `split`, before eval carving. eval comes from eval_split
    (capped to eval_size rows when > 0) or, failing that, eval_size rows carved off train by a seeded
    shuffle. Train never shares a prompt with eval: overlapping train rows are dropped and logged.
    cache_dir: where Hub datasets are cached (None: the datasets default).
    """
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    preset, local = {}, isinstance(source, str) and os.path.isdir(source)
    if isinstance(source, str) and (local or not os.path.exists(source)):
        preset = preset_for(os.path.basename(os.path.normpath(source))) or {}
    config_name = config_name or preset.get("config_name")
    user_fn = _resolve_fn(processing_fn)

    def examples(split_, cap):
        table = _load(source, config_name, split_, seed, max_samples, cache_dir)
        if cap is not None:
            table = table.select(range(min(cap, len(table)))) if isinstance(table, Dataset) else table[:cap]
        rows = table.to_list() if isinstance(table, Dataset) else table
        use = preset and not (local and rows and not set(preset["needs"]) <= rows[0].keys())  # a folder of other data
        row_fn = preset["row"] if use and "row" in preset and not column_mapping else None
        rows = [row_fn(r) for r in rows] if row_fn else rows
        rows = [user_fn(r) for r in rows] if user_fn else rows
        return _to_examples(rows, column_mapping or (preset["columns"] if use else None),
                            preset.get("extract", {}) if use else {})

    train = examples(split, max_samples)
    if eval_split is not None:
        eval_ = examples(eval_split, eval_size or None)
    elif eval_size > 0:
        if eval_size >= len(train):
            raise ValueError(f"eval_size={eval_size} leaves no training data ({len(train)} examples); lower it")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = set(order[:eval_size])
        eval_ = [train[i] for i in sorted(held)]
        train = [ex for i, ex in enumerate(train) if i not in held]
    else:
        eval_ = []
    seen = {_prompt_key(ex["prompt"]) for ex in eval_}
    kept = [ex for ex in train if _prompt_key(ex["prompt"]) not in seen]
    if len(kept) < len(train):
        log.info("dropped %d training examples whose prompt is in the eval set", len(train) - len(kept))
    return kept, eval_


# ----------------------------------------------------------------------------- prompts and batches

def render_prompt(tokenizer, prompt, system_prompt=None, enable_thinking=None):
    """The prompt as model input text: the chat template with a generation prompt, else plain text.

    Without a chat template: f"{system_prompt}\\n\\n{text}\\n", or just the text with no system prompt;
    a messages list becomes its contents joined by blank lines.
    """
    messages = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    system = [m["content"] for m in messages if m["role"] == "system"]
    text = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
    return f"{system[0]}\n\n{text}\n" if system else text


def encode_prompts(tokenizer, texts, max_length):
    """Tokenise rendered prompts (no special tokens added), keep each one's last max_length tokens,
    left-pad to the longest. Returns (input_ids, attention_mask, n_truncated)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    n_truncated = sum(len(x) > max_length for x in ids)
    ids = [x[-max_length:] if len(x) > max_length else x for x in ids]
    P = max((len(x) for x in ids), default=0)
    input_ids = torch.full((len(ids), P), pad, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(ids), P), dtype=torch.long)  # (B, P)
    for i, x in enumerate(ids):
        if x:
            input_ids[i, P - len(x):] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, P - len(x):] = 1
    return input_ids, attention_mask, n_truncated


def batch_indices(n, batch_size, step, seed, rank=0, world_size=1):
    """Example indices of `rank` at global `step`: a contiguous batch_size slice of the endless stream
    of per-epoch permutations randperm(n, seed + epoch); each step consumes batch_size*world_size."""
    if n <= 0 or batch_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"batch_indices needs n > 0, batch_size > 0, 0 <= rank < world_size; "
                         f"got n={n}, batch_size={batch_size}, rank={rank}, world_size={world_size}")
    start = (step * world_size + rank) * batch_size
    first, last = start // n, (start + batch_size - 1) // n
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
                       for e in range(first, last + 1)])  # (epochs spanned * n,)
    return order[start - first * n:start - first * n + batch_size].tolist()

