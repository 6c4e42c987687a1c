"""Examples, prompts and the data stream: what the trainer feeds the sampler.

load_examples turns a Hub dataset, a local file or folder, an in-memory list or the offline "toy"
task into lists of {"prompt", "reference", **other columns}; render_prompt applies the chat template;
encode_prompts left-pads token ids; batch_indices is the deterministic, rank-aware shuffled stream.
"""
import logging
import os
import random

import torch
from datasets import Dataset, DatasetDict, ReadInstruction, load_dataset, load_from_disk

from common import callable_from
from tasks import preset_for, resolve_mapping, toy_task

log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


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


def _to_examples(rows, column_mapping, extract):
    """Rename mapped columns, extract references, keep every other column untouched."""
    if not rows:
        return []
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"row {bad} is {rows[bad]!r:.200}, not a dict (a processing_fn must return the row)")
    mapping = resolve_mapping(rows[0].keys(), column_mapping)
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

    source: a Hub name, a .json/.jsonl/.csv/.parquet file (one "train" split), a folder (save_to_disk or data
    files), a list of dicts, or "toy" (toy_task of max_samples or 2000 rows, seeded by `seed`). A preset
    (tasks.py) applies to Hub names, "toy" and local folders named like one ("mbpp/") that hold its columns; a
    column_mapping ({source column: "prompt" | "reference" | new name}) replaces its mapping and row builder.
    max_samples keeps the first rows of `split`. eval comes from eval_split (capped to eval_size rows when > 0),
    else eval_size rows carved off train by a seeded shuffle; train rows whose prompt is in eval are dropped.
    """
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    preset, local = {}, isinstance(source, str) and os.path.isdir(source)
    if isinstance(source, str) and (local or not os.path.exists(source)):
        preset = preset_for(os.path.basename(os.path.normpath(source))) or {}
    config_name = config_name or preset.get("config_name")
    user_fn = None if processing_fn is None else callable_from(processing_fn, "processing_fn")

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

