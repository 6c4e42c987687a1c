"""Examples, prompts and the data stream: what the trainer feeds the sampler.

load_examples turns a Hub dataset, a local file or folder, an in-memory list or the offline "toy"
task into lists of {"prompt", "reference", **other columns}; render_prompt applies the chat template;
encode_prompts left-pads token ids; batch_indices is the deterministic, rank-aware shuffled stream.
"""
import functools
import os
import random
from collections import Counter
from collections.abc import Mapping

import torch

from common import callable_from, log, warn_once
from tasks import preset_by_shape, preset_for, resolve_mapping, toy_task

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLITS = ("test", "validation")  # a source's own held-out splits, the first found is used


# ----------------------------------------------------------------------------- loading

def _hf():
    """The `datasets` package, imported where a file, folder, Hub name or split slice needs it."""
    try:
        import datasets
    except ImportError:
        raise ImportError("this dataset needs the `datasets` package: pip install datasets (the toy task and "
                          "in-memory rows with a whole split, e.g. split='train', do not)") from None
    return datasets


def _is_table(table):
    """Whether table is a datasets.Dataset (else a list or tuple of row dicts)."""
    return not isinstance(table, (list, tuple))


def _split_rows(splits, split):
    """Rows of `split` (HF syntax, e.g. 'train[:10%]') from a dict of in-memory splits (lists or Datasets)."""
    if "[" not in split and "+" not in split and not any(map(_is_table, splits.values())):  # no `datasets` needed
        if split not in splits:
            raise ValueError(f"Unknown split {split!r}. Should be one of {list(splits)}.")
        return [dict(r) for r in splits[split]]
    rows = []
    for part in _hf().ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in splits.items()}):
        table = splits[part.splitname]
        rows += (table.select(range(part.from_, part.to)).to_list() if _is_table(table)
                 else [dict(r) for r in table[part.from_:part.to]])
    return rows


def _rows(table):
    """A Dataset's rows as dicts; a list as it is."""
    return table.to_list() if _is_table(table) else table


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
        return _hf().load_dataset(FILE_BUILDERS[ext], data_files=source, split=split)
    if os.path.isdir(source):
        if not any(os.path.exists(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json")):
            return _hf().load_dataset(source, split=split)  # a folder of data files
        saved = _hf().load_from_disk(source)  # written by save_to_disk
        return _split_rows(dict(saved) if isinstance(saved, _hf().DatasetDict) else {"train": saved}, split)
    if os.path.splitext(source)[1].lower() in FILE_BUILDERS or source.startswith(("/", ".", "~")):
        raise ValueError(f"dataset_name={source!r} is not an existing file or folder: check the path, "
                         "or give a Hub name like 'openai/gsm8k'")
    try:
        return _hf().load_dataset(source, config_name, split=split, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as e:  # offline, or no such dataset on the Hub
        raise ValueError(f"dataset_name={source!r} could not be loaded ({str(e).splitlines()[0]}): check the "
                         "name, go online, or give a local file or folder") from None


def _first(table, n):
    """The first n rows (all for None) of a Dataset or a list, as the same kind."""
    if n is None:
        return table
    return table.select(range(min(n, len(table)))) if _is_table(table) else table[:n]


def _checked(fn, batched, rows, indices):
    """fn(rows) as Dataset.map(with_indices=True) calls it; ValueError unless it returns one row (a dict) or,
    batched, a batch (a dict of equal-length lists)."""
    out = fn(rows)  # a dict, or the Mapping (LazyRow, LazyBatch) it was given, changed in place
    out = dict(out) if isinstance(out, Mapping) else out
    lists = isinstance(out, dict) and all(hasattr(v, "__len__") and not isinstance(v, (str, bytes, dict))
                                          for v in out.values())
    if batched and not (lists and len({len(v) for v in out.values()}) <= 1):
        raise ValueError(f"processing_fn returned {out!r:.200} for the batch of rows {indices[0]}-{indices[-1]}, "
                         "not a dict of equal-length lists: with processing_batched=True it gets and returns a batch "
                         "(a dict of lists, as datasets.map(batched=True)); set processing_batched=False for a "
                         "function of one row")
    if not batched and not isinstance(out, dict):
        raise ValueError(f"processing_fn returned {out!r:.200} for row {indices}, not a dict: return the row "
                         "(processing_batched=True gives it a batch, a dict of lists, instead)")
    return {k: list(v) for k, v in out.items()} if batched else out


def _process(table, fn, batched):
    """The rows of table (a Dataset or a list of row dicts) through a processing_fn, called as
    Dataset.map(fn, batched=batched) calls it: one row (a dict) or a batch (a dict of lists) at a time."""
    check = functools.partial(_checked, fn, batched)
    if batched and not _is_table(table):
        table = _hf().Dataset.from_list(table)
    if _is_table(table):
        return table.map(check, batched=batched, with_indices=True, remove_columns=table.column_names,
                         keep_in_memory=True, desc="processing_fn").to_list()
    return [check(row, i) for i, row in enumerate(table)]


def _to_examples(rows, column_mapping, extract):
    """Rename mapped columns, extract references, keep every other column untouched."""
    if not rows:
        return []
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"row {bad} is {rows[bad]!r:.200}, not a dict: give rows as {{column: value}} dicts")
    mapping = resolve_mapping(rows[0], column_mapping)
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


def _own_eval_split(load, split, size):
    """(name, its first `size` rows) of the source's first split of EVAL_SPLITS that `split` does not read from;
    None when it has none."""
    for name in EVAL_SPLITS:
        if name not in {part.split("[")[0].strip() for part in split.split("+")}:
            try:
                return name, load(name, size)
            except ValueError as e:
                if "Unknown split" not in str(e):
                    raise
    return None


def _carve(train, size, keep, seed, split):
    """(train, eval): `size` examples held out by a seeded shuffle; fewer, with a warning, where `size` would
    leave under `keep` training examples once the ones repeating a held-out prompt are dropped too."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    counts, held, left = Counter(_prompt_key(ex["prompt"]) for ex in train), set(), []
    for i in order[:size]:
        key = _prompt_key(train[i]["prompt"])
        left.append((left[-1] if left else len(train)) - (counts[key] if key not in held else 0))
        held.add(key)
    n = next((k for k, m in enumerate(left) if m < keep), size)
    if n < size:
        warn_once(f"eval: holding out {n} prompts instead of eval_size={size}: {size} would leave {left[-1]} of the "
                  f"{len(train)} training prompts of split={split!r} (a held-out prompt leaves training with its "
                  f"repeats), fewer than one batch ({keep}: batch_size x processes); give an eval_split, widen split "
                  "or raise max_samples for a full eval")
    chosen = set(order[:n])
    return [ex for i, ex in enumerate(train) if i not in chosen], [train[i] for i in sorted(chosen)]


def load_examples(source, *, config_name=None, split="train", eval_split=None, eval_size=0, max_samples=None,
                  column_mapping=None, processing_fn=None, processing_batched=False, seed=42, min_train=0,
                  cache_dir=None):
    """(train, eval) lists of {"prompt", "reference", **other columns} from one source.

    source: a Hub name, a .json/.jsonl/.csv/.parquet file (one "train" split), a folder (save_to_disk or data
    files), a list of dicts, or "toy" (toy_task of max_samples or 2000 rows, seeded by `seed`). A preset
    (tasks.py) applies to Hub names, "toy" and local folders named like one ("mbpp/") that hold its columns,
    and, without a column_mapping, to a local source whose rows have one's shape (tasks.preset_by_shape); a
    column_mapping ({source column: "prompt" | "reference" | new name}) replaces its mapping and row builder.
    processing_fn gets and returns one row, or with processing_batched a batch (a dict of lists), as
    Dataset.map(batched=processing_batched) passes it. max_samples keeps the first rows of `split`.
    eval: eval_split (its first eval_size rows when eval_size > 0); else, when eval_size > 0, the first eval_size
    rows of the source's own "test" (else "validation") split, else (or with eval_split="carve") eval_size rows
    carved off train by a shuffle seeded by `seed`, fewer where more would leave under min_train (one batch). Train rows
    whose prompt is in eval are dropped; a ValueError when that leaves under min_train (or none).
    """
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    local = not isinstance(source, str) or os.path.exists(source)  # a list, file or folder
    preset = {} if not isinstance(source, str) or os.path.isfile(source) else \
        preset_for(os.path.basename(os.path.normpath(source))) or {}
    config_name = config_name or preset.get("config_name")
    user_fn = None if processing_fn is None else callable_from(processing_fn, "processing_fn")
    keep = max(min_train, 1)

    def load(split_, cap):
        return _first(_load(source, config_name, split_, seed, max_samples, cache_dir), cap)

    train_table = load(split, max_samples)
    head = _rows(_first(train_table, 20))
    if preset and local and head and not set(preset["needs"]) <= head[0].keys():
        preset = {}  # a folder named like a preset that holds other data
    if not preset and local and not column_mapping and (shape := preset_by_shape(head)):
        what = f"dataset_name={source!r}" if isinstance(source, str) else f"the list of {len(source)} rows"
        log.info(f"{what} has {shape[0]}'s columns {sorted(head[0])}: its preset maps them (a column_mapping "
                 "would replace it)")
        preset = shape[1]
    row_fn = None if column_mapping else preset.get("row")

    def examples(table):
        rows = [row_fn(r) for r in _rows(table)] if row_fn else table
        rows = _process(rows, user_fn, processing_batched) if user_fn else _rows(rows)
        mapping = column_mapping or preset.get("columns")
        if not column_mapping and mapping and rows and not set(mapping) <= rows[0].keys():
            return _to_examples(rows, None, {})  # a processing_fn renamed the preset's columns: they are its own
        return _to_examples(rows, mapping, preset.get("extract", {}))

    train, eval_, where = examples(train_table), [], None
    if eval_split not in (None, "carve"):
        eval_, where = examples(load(eval_split, eval_size or None)), f"eval_split={eval_split!r}"
    elif eval_size > 0 and eval_split is None and (own := _own_eval_split(load, split, eval_size)):
        eval_, where = examples(own[1]), f"the dataset's {own[0]!r} split"
        log.info(f"eval: the first {len(eval_)} prompts of {where} (eval_split=None, eval_size={eval_size}); "
                 "set eval_split to choose others, or eval_size=0 for none")
    elif eval_size > 0:
        train, eval_ = _carve(train, eval_size, keep, seed, split)
    seen = {_prompt_key(ex["prompt"]) for ex in eval_}
    kept = [ex for ex in train if _prompt_key(ex["prompt"]) not in seen]
    dropped = len(train) - len(kept)
    if dropped and len(kept) < keep:
        raise ValueError(f"{dropped} of the {len(train)} training prompts (split={split!r}, max_samples={max_samples}) "
                         f"are also in the eval set ({where}, eval_size={eval_size}) and were dropped, so that none is "
                         f"both trained and evaluated on, leaving {len(kept)}"
                         + (f", fewer than one batch ({keep}: batch_size x processes)" if kept else "")
                         + ": give another eval_split, set eval_size=0, or deduplicate the data")
    if dropped:
        log.info(f"dropped {dropped} training examples whose prompt is in the eval set")
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

