"""data.py: loading, presets, eval carving, prompt rendering, encoding and the batch stream. Offline."""
import copy
import json
import random
import re
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

import config
import data
import load
import tasks
import tiny

ROWS = tasks.toy_task(12, seed=3)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny.make_tiny(str(folder), corpus=[r["question"] for r in tasks.toy_task(200)])
    return AutoTokenizer.from_pretrained(str(folder))


def write(path, rows):
    """Write rows to a json/jsonl/csv/parquet file by suffix; returns the path as str."""
    ds = Dataset.from_list(rows)
    {".json": lambda p: Path(p).write_text(json.dumps(rows)), ".jsonl": ds.to_json,
     ".csv": lambda p: ds.to_csv(p, index=False), ".parquet": ds.to_parquet}[path.suffix](str(path))
    return str(path)


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_mapping_and_autodetect(tmp_path, suffix):
    path = write(tmp_path / f"d{suffix}", ROWS)
    mapped, ev = data.load_examples(path, column_mapping={"question": "prompt", "answer": "reference"})
    assert mapped == [{"prompt": r["question"], "reference": r["answer"]} for r in ROWS] and ev == []
    auto, _ = data.load_examples(path)  # GSM8K's shape: its preset extracts the number after '####'
    assert auto == [{"prompt": r["question"], "reference": r["answer"].split("#### ")[1]} for r in ROWS]


def test_split_syntax_and_max_samples(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS)
    assert [e["prompt"] for e in data.load_examples(path, split="train[:5]")[0]] == [r["question"] for r in ROWS[:5]]
    assert len(data.load_examples(path, max_samples=4)[0]) == 4
    assert len(data.load_examples(ROWS, split="train[:50%]")[0]) == 6


def test_folders(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    train, _ = data.load_examples(tmp_path / "saved", split="train[2:4]")
    assert [e["prompt"] for e in train] == [r["question"] for r in ROWS[2:4]]
    (tmp_path / "files").mkdir()
    write(tmp_path / "files" / "train.jsonl", ROWS)
    assert [e["prompt"] for e in data.load_examples(str(tmp_path / "files"))[0]] == [r["question"] for r in ROWS]


def test_gsm8k_preset_and_extraction():
    for name in ("openai/gsm8k", "gsm8k", "toy"):
        assert tasks.preset_for(name)["config_name"] == "main"
    assert tasks.preset_for("EleutherAI/hendrycks_math") is tasks.preset_for("math")
    assert tasks.preset_for("someone/unknown") is None
    assert tasks.extract_gsm8k("Janet sells 16 - 3 - 4 = 9 eggs... 9 * 2 = 18\n#### 18") == "18"
    assert tasks.extract_gsm8k("#### 1,234") == "1234"
    assert tasks.extract_gsm8k("no marker") is None
    train, _ = data.load_examples("toy", max_samples=30, seed=1)
    raw = tasks.toy_task(30, seed=1)
    assert len(train) == 30
    assert [(e["prompt"], e["reference"]) for e in train] == [(r["question"], r["answer"].split("#### ")[1]) for r in raw]


def test_boxed_extraction():
    assert tasks.extract_boxed(r"so \boxed{1} then \boxed{\frac{a}{b}} done") == r"\frac{a}{b}"
    assert tasks.extract_boxed(r"\boxed{x") is None
    assert tasks.extract_boxed("none") is None


def test_missing_column_and_bad_processing_fn():
    with pytest.raises(ValueError, match=r"nope.*'answer'.*'question'"):
        data.load_examples(ROWS, column_mapping={"nope": "prompt"})
    with pytest.raises(ValueError, match="column_mapping"):
        data.load_examples([{"text_a": "x"}])
    for bad in ("no_such_module_xyz:f", "json:no_such_fn", "json"):
        with pytest.raises(ValueError, match="processing_fn"):
            data.load_examples(ROWS, processing_fn=bad)


def test_processing_fn_and_extra_columns():
    rows = [{"text": f"write f{i}", "code": f"def f{i}(): pass", "test_list": [f"assert f{i}() is None"]}
            for i in range(3)]
    train, _ = data.load_examples(rows, column_mapping={"text": "prompt", "code": "reference"},
                                  processing_fn=lambda r: {**r, "text": r["text"].upper()})
    assert train[1] == {"prompt": "WRITE F1", "reference": "def f1(): pass", "test_list": ["assert f1() is None"]}
    train, _ = data.load_examples(ROWS[:2], processing_fn="copy:copy")
    assert train[0]["prompt"] == ROWS[0]["question"]


@pytest.mark.parametrize("rows,fn", [
    (ROWS[:2], lambda r: r.update(question="x")),  # mutates and forgets to return the row
    ([{"question": "a", "answer": "1"}, {"question": "b"}], None),  # a row without the mapped column
])
def test_rows_that_do_not_fit_the_mapping_name_the_row(rows, fn):
    with pytest.raises(ValueError, match="row 1|row 0"):
        data.load_examples(rows, column_mapping={"question": "prompt", "answer": "reference"}, processing_fn=fn)


def test_eval_carving_disjoint_with_duplicates():
    rows = [{"prompt": f"q{i % 10}", "reference": str(i)} for i in range(40)]  # every prompt 4 times
    train, ev = data.load_examples(rows, eval_size=5, seed=0)
    assert len(ev) == 5
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in ev}
    assert len(train) == 40 - 4 * len({e["prompt"] for e in ev})
    assert data.load_examples(rows, eval_size=5, seed=0) == (train, ev)


def test_eval_split_overlap_removed(tmp_path, logged):
    path = write(tmp_path / "d.jsonl", ROWS)
    train, ev = data.load_examples(path, split="train", eval_split="train[:3]")
    assert len(ev) == 3 and len(train) == len(ROWS) - 3
    assert "dropped 3" in logged.text
    _, ev = data.load_examples(path, eval_split="train[:5]", eval_size=2)
    assert len(ev) == 2


def batched_upper(batch):
    return {**batch, "question": [q.upper() for q in batch["question"]]}


@pytest.mark.parametrize("as_file", [True, False])  # a Dataset through Dataset.map, and a list of rows
def test_processing_fn_one_row_or_a_batch(tmp_path, as_file):
    source = write(tmp_path / "d.jsonl", ROWS) if as_file else ROWS
    by_row, _ = data.load_examples(source, processing_fn=lambda r: {**r, "question": r["question"].upper()})
    by_batch, _ = data.load_examples(source, processing_fn=batched_upper, processing_batched=True)
    assert by_row == by_batch and [e["prompt"] for e in by_row] == [r["question"].upper() for r in ROWS]
    seen = []  # a batch is a dict of lists, as datasets.map(batched=True) passes it; it may change the row count
    kept, _ = data.load_examples(source, processing_batched=True, processing_fn=lambda b: seen.append(b) or
                                 {k: v[::2] for k, v in b.items()})
    assert set(seen[0]) == {"question", "answer"} and seen[0]["question"] == [r["question"] for r in ROWS]
    assert [e["prompt"] for e in kept] == [r["question"] for r in ROWS[::2]]


def upper_in_place(row):
    row["question"] = row["question"].upper()  # datasets.map's usual form: change what it gives, return it
    return row


def batched_upper_in_place(batch):
    batch["question"] = [q.upper() for q in batch["question"]]
    return batch


@pytest.mark.parametrize("as_file", [True, False])
@pytest.mark.parametrize("fn,batched", [(upper_in_place, False), (batched_upper_in_place, True)])
def test_processing_fn_may_change_what_it_is_given_and_return_it(tmp_path, as_file, fn, batched):
    source = write(tmp_path / "d.jsonl", ROWS) if as_file else [dict(r) for r in ROWS]
    train, _ = data.load_examples(source, processing_fn=fn, processing_batched=batched)
    assert [e["prompt"] for e in train] == [r["question"].upper() for r in ROWS]


def test_a_processing_fn_that_renames_a_presets_columns_makes_its_own(tmp_path):
    path = write(tmp_path / "gsm8k_shaped.jsonl", ROWS)  # GSM8K's shape, renamed by the function
    train, _ = data.load_examples(path, processing_fn=lambda r: {"prompt": r["question"], "reference": "7"})
    assert [(e["prompt"], e["reference"]) for e in train] == [(r["question"], "7") for r in ROWS]


@pytest.mark.parametrize("as_file", [True, False])
@pytest.mark.parametrize("fn,batched,message", [
    (lambda r: None, False, r"returned None for row 0, not a dict: return the row"),
    (lambda r: [r], False, r"for row 0, not a dict"),
    (lambda b: {"question": "x", "answer": "1"}, True, r"batch of rows 0-11, not a dict of equal-length lists.*"
                                                        r"processing_batched=False"),
    (lambda b: {"question": b["question"], "answer": b["answer"][:1]}, True, "equal-length"),
    (lambda b: None, True, "returned None for the batch"),
])
def test_processing_fn_of_the_wrong_shape_says_what_it_must_return(tmp_path, as_file, fn, batched, message):
    source = write(tmp_path / "d.jsonl", ROWS) if as_file else ROWS
    with pytest.raises(ValueError, match=message):
        data.load_examples(source, processing_fn=fn, processing_batched=batched)


# ----------------------------------------------------------------------------- the eval split policy

def saved(tmp_path, **splits):
    """A save_to_disk DatasetDict folder of the given splits (lists of rows)."""
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def files(tmp_path, **splits):
    """A folder of data files, one <split>.jsonl per split."""
    (tmp_path / "files").mkdir()
    for k, v in splits.items():
        write(tmp_path / "files" / f"{k}.jsonl", v)
    return str(tmp_path / "files")


QA = [{"question": f"q{i}?", "answer": str(i)} for i in range(300)]  # a generic question/answer dataset


@pytest.mark.parametrize("folder", [saved, files])
def test_eval_comes_from_the_sources_own_test_then_validation_split(tmp_path, folder, logged):
    source = folder(tmp_path, train=QA[:100], test=QA[100:200], validation=QA[200:])
    train, ev = data.load_examples(source, eval_size=30)
    assert train == [{"prompt": r["question"], "reference": r["answer"]} for r in QA[:100]]  # nothing carved
    assert [e["prompt"] for e in ev] == [r["question"] for r in QA[100:130]]
    assert "the first 30 prompts of the dataset's 'test' split" in logged.text
    assert [e["prompt"] for e in data.load_examples(source, split="test", eval_size=5)[1]] == \
        [r["question"] for r in QA[200:205]]  # never evaluated on the split it trains on
    assert data.load_examples(source, eval_size=0)[1] == []


def test_eval_from_the_validation_split_and_overlap_dropped(tmp_path):
    source = saved(tmp_path, train=QA[:100], validation=QA[90:120])
    train, ev = data.load_examples(source, eval_size=64)
    assert [e["prompt"] for e in ev] == [r["question"] for r in QA[90:120]]
    assert [e["prompt"] for e in train] == [r["question"] for r in QA[:90]]


def test_one_percent_of_gsm8k_keeps_one_batch(tmp_path, logged):
    rows = tasks.toy_task(7500, seed=0)  # 'train[:1%]' is 75 rows, as GSM8K's 7,473
    test = [{"question": f"held out {i}?", "answer": f"#### {i}"} for i in range(100)]
    train, ev = data.load_examples(files(tmp_path, train=rows, test=test), split="train[:1%]", eval_size=64,
                                   min_train=16)
    assert len(train) == 75 and len(ev) == 64 and not [r for r in logged.records if r.levelname == "WARNING"]
    train, ev = data.load_examples(write(tmp_path / "one.jsonl", rows), split="train[:1%]", eval_size=64,
                                   min_train=16)  # no test split: carved, but never below one batch
    assert len(train) == 16 and len(ev) == 59
    warnings = [r.getMessage() for r in logged.records if r.levelname == "WARNING"]
    assert warnings == ["eval: holding out 59 prompts instead of eval_size=64: 64 would leave 11 of the 75 training "
                        "prompts of split='train[:1%]' (a held-out prompt leaves training with its repeats), fewer "
                        "than one batch (16: batch_size x processes); give an eval_split, widen split or raise "
                        "max_samples for a full eval"]


def test_the_demos_carve_is_unchanged():
    train, ev = data.load_examples("toy", max_samples=2000, eval_size=200, seed=0)
    rows = [{"prompt": r["question"], "reference": r["answer"].split("#### ")[1]} for r in tasks.toy_task(2000, seed=0)]
    order = list(range(2000))
    random.Random(0).shuffle(order)
    held = set(order[:200])
    expected_eval = [rows[i] for i in sorted(held)]
    seen = {e["prompt"] for e in expected_eval}
    assert ev == expected_eval
    assert train == [r for i, r in enumerate(rows) if i not in held and r["prompt"] not in seen]


def test_repeated_prompts_carve_less_or_say_they_were_all_dropped(tmp_path, logged):
    rows = [{"prompt": "the same question", "reference": str(i)} for i in range(20)]
    train, ev = data.load_examples(rows, eval_size=5)
    assert len(train) == 20 and ev == [] and "holding out 0 prompts instead of eval_size=5" in logged.text
    with pytest.raises(ValueError, match=r"^20 of the 20 training prompts \(split='train', max_samples=None\) are "
                                         r"also in the eval set \(eval_split='train\[:1\]', eval_size=0\) and were "
                                         r"dropped.*leaving 0: give another eval_split, set eval_size=0, or deduplicate "
                                         r"the data$"):
        data.load_examples(rows, eval_split="train[:1]")
    source = saved(tmp_path, train=rows, test=rows[:1])
    with pytest.raises(ValueError, match=r"20 of the 20 .*\(the dataset's 'test' split, eval_size=5\)"):
        data.load_examples(source, eval_size=5)


# ----------------------------------------------------------------------------- presets by shape

def test_local_sources_shaped_like_a_preset_get_it(tmp_path, logged):
    train, _ = data.load_examples(write(tmp_path / "mbpp_copy.jsonl", MBPP_ROWS))
    assert "`remove_Occ`" in train[0]["prompt"] and train[0]["reference"] == MBPP_ROWS[0]["code"]
    assert "has mbpp's columns" in logged.text
    math_rows = [{"problem": "1+1?", "solution": r"so \boxed{2}"}, {"problem": "2+2?", "solution": r"\boxed{4}."}]
    assert [e["reference"] for e in data.load_examples(math_rows)[0]] == ["2", "4"]
    gsm8k, _ = data.load_examples(saved(tmp_path, train=ROWS))
    assert gsm8k[0]["reference"] == ROWS[0]["answer"].split("#### ")[1]
    sanitized = [{("prompt" if k == "text" else k): v for k, v in r.items()} for r in MBPP_ROWS]  # mbpp/sanitized
    train, _ = data.load_examples(sanitized)
    assert "`remove_Occ`" in train[0]["prompt"] and train[0]["reference"] == MBPP_ROWS[0]["code"]
    plain, _ = data.load_examples(QA[:3] + [{"question": "q?", "answer": "no marker #### here"}])
    assert [e["reference"] for e in plain] == ["0", "1", "2", "no marker #### here"]  # no GSM8K extraction


@pytest.mark.parametrize("row,guess", [
    ({"code": "def f(): pass", "test_cases": "assert f() is None", "description": "Write f."}, "'description'"),
    ({"code": "x" * 99, "body": "Write a function that adds two numbers.", "task_id": "abcdefghijklmnopqrstuvwxyz",
      "canonical_solution": "y" * 99, "title": "add"}, "'body'"),
    ({"code": "def f(): pass", "n": 3}, "'<the column with the task>'"),
])
def test_a_needed_mapping_suggests_a_prompt_like_column(row, guess):
    with pytest.raises(ValueError, match=rf"no prompt column among .*column_mapping={{{guess}: 'prompt'}}$"):
        data.load_examples([row])


# ----------------------------------------------------------------------------- load.task

def run_config(source, **kw):
    return config.Config(dataset_name=source, device="cpu", **kw)


def test_task_carves_with_data_seed_and_keeps_one_batch(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", QA[:40])
    rewards = load.reward_fns(run_config(path))
    cfg = run_config(path, eval_size=8, batch_size=4, seed=1)
    assert load.data_seed(cfg) == 1 and load.data_seed(run_config(path, seed=1, data_seed=7)) == 7
    by_seed = load.task(cfg, tokenizer, rewards)[1]
    assert by_seed == load.task(run_config(path, eval_size=8, batch_size=4, seed=2, data_seed=1), tokenizer, rewards)[1]
    assert by_seed != load.task(run_config(path, eval_size=8, batch_size=4, seed=1, data_seed=2), tokenizer, rewards)[1]
    train, ev = load.task(run_config(path, eval_size=64, batch_size=16), tokenizer, rewards, world=2)
    assert len(train) == 32 and len(ev) == 8


def test_task_says_which_settings_share_short_data(tokenizer, tmp_path):
    path = write(tmp_path / "d.jsonl", QA[:40])
    cfg = run_config(path, split="train[:25%]", max_samples=20, eval_size=64, batch_size=16)
    with pytest.raises(ValueError, match=r"^10 training prompts cannot fill one batch \(batch_size=16 x 1 "
                                         r"process\(es\)\): they are the rows of split='train\[:25%\]', capped by max_samples=20, less "
                                         r"the eval prompts \(eval_size=64, eval_split=None\); widen split, raise "
                                         r"max_samples, lower eval_size or batch_size, or add data$"):
        load.task(cfg, tokenizer, load.reward_fns(cfg))
    cfg = run_config(path, split="train[:2]", batch_size=16, reward_functions=["code_correctness"])
    with pytest.raises(ValueError, match=r"^2 training prompts cannot fill one batch"):  # before the rewards' check
        load.task(cfg, tokenizer, load.reward_fns(cfg))


# ----------------------------------------------------------------------------- prompts

def test_render_prompt_chat_and_plain(tokenizer):
    text = data.render_prompt(tokenizer, "What is 2 + 3?", system_prompt="Think step by step.")
    assert "Think step by step." in text and "What is 2 + 3?" in text
    assert text.endswith("<|im_start|>assistant\n")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert data.render_prompt(tokenizer, messages, system_prompt="other").count("system") == 1
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert data.render_prompt(plain, "Q?", system_prompt="S") == "S\n\nQ?\n"
    assert data.render_prompt(plain, "Q?") == "Q?"


def test_encode_prompts_left_pad_and_truncate(tokenizer):
    texts = [data.render_prompt(tokenizer, q) for q in ("Tom has 7 apples.", "How many apples does Tom have now?")]
    ids, mask, n_trunc = data.encode_prompts(tokenizer, texts, max_length=512)
    assert ids.shape == mask.shape and ids.dtype == mask.dtype == torch.long and n_trunc == 0
    lengths = mask.sum(1)
    short = int(lengths.argmin())
    assert lengths.min() < lengths.max()
    pads = ids.shape[1] - int(lengths[short])
    assert (ids[short, :pads] == tokenizer.pad_token_id).all() and (mask[short, :pads] == 0).all()
    assert (mask[short, pads:] == 1).all()
    for i, t in enumerate(texts):
        assert tokenizer.decode(ids[i][mask[i].bool()]) == t
    ids2, mask2, n_trunc = data.encode_prompts(tokenizer, texts, max_length=5)
    assert ids2.shape == (2, 5) and n_trunc == 2 and mask2.all()
    assert tokenizer.decode(ids2[0]) == tokenizer.decode(ids[0][mask[0].bool()][-5:])
    assert texts[0].endswith(tokenizer.decode(ids2[0]))


# ----------------------------------------------------------------------------- batches

def test_batch_indices_ranks_disjoint_and_union():
    n, bs, W = 37, 4, 3
    for step in range(8):
        shards = [data.batch_indices(n, bs, step, seed=5, rank=r, world_size=W) for r in range(W)]
        whole = data.batch_indices(n, bs * W, step, seed=5)
        assert sum(shards, []) == whole
        if (step * bs * W) // n == ((step + 1) * bs * W - 1) // n:  # within one epoch
            assert len(set(whole)) == len(whole)


def test_batch_indices_epochs_are_permutations():
    n, bs = 10, 5
    stream = sum((data.batch_indices(n, bs, s, seed=1) for s in range(6)), [])
    epochs = [stream[i:i + n] for i in range(0, len(stream), n)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert stream == sum((data.batch_indices(n, bs, s, seed=1) for s in range(6)), [])
    assert data.batch_indices(3, 7, 0, seed=0)[:3] == torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()
    with pytest.raises(ValueError, match="rank"):
        data.batch_indices(n, bs, 0, seed=0, rank=2, world_size=2)


# ----------------------------------------------------------------------------- toy task

def test_toy_task_deterministic_and_correct():
    assert tasks.toy_task(50, seed=7) == tasks.toy_task(50, seed=7)
    assert tasks.toy_task(50, seed=7) != tasks.toy_task(50, seed=8)
    rows = tasks.toy_task(300, seed=0, max_value=20, ops="+-*")
    assert {r["answer"].split()[1] for r in rows} == {"+", "-", "*"}
    for r in rows:
        a, op, b, c = re.match(r"(\d+) ([-+*]) (\d+) = (\d+)\n#### (\d+)$", r["answer"]).group(1, 2, 3, 4)
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 0
        assert int(r["answer"].split("#### ")[1]) == c
        assert str(a) in r["question"] and str(b) in r["question"]
        assert max(a, b) <= (12 if op == "*" else 20)
    assert len({r["question"] for r in rows}) > 200
    with pytest.raises(ValueError, match="ops"):
        tasks.toy_task(1, ops="/")


MBPP_ROWS = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.",
     "code": "def remove_Occ(s,ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n    return s[:i] + s[i+1:] if i >= 0 else s",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 14, "text": "Write a python function to find the volume of a triangular prism.",
     "code": "def find_Volume(l,b,h):\n    return (l * b * h) / 2",
     "test_list": ["assert math.isclose(find_Volume(10,8,6), 240)", "assert find_Volume(3,2,2) == 6"],
     "test_setup_code": "import math", "challenge_test_list": []},
]


def test_mbpp_preset_names_the_function_and_keeps_the_tests(tmp_path):
    folder = tmp_path / "mbpp"  # a local copy under the dataset's name gets its preset
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in MBPP_ROWS)
    train, _ = data.load_examples(str(folder))
    assert [ex["reference"] for ex in train] == [r["code"] for r in MBPP_ROWS]
    assert "`remove_Occ`" in train[0]["prompt"] and 'assert remove_Occ("hello","l") == "heo"' in train[0]["prompt"]
    assert "`find_Volume`" in train[1]["prompt"]  # math.isclose is not the function
    assert train[1]["test_list"] == MBPP_ROWS[1]["test_list"] and train[1]["test_setup_code"] == "import math"
    assert "text" not in train[0]
    assert tasks.mbpp_function("assert set(similar_elements((3, 4), (5, 4))) == set((4,))") == "similar_elements"
    assert tasks.mbpp_function("assert not is_not_prime(2)") == "is_not_prime"
    # a user mapping replaces the preset, row builder included
    train, _ = data.load_examples(str(folder), column_mapping={"text": "prompt", "code": "reference"})
    assert train[0]["prompt"] == MBPP_ROWS[0]["text"]


def test_a_local_folder_named_like_a_preset_without_its_columns_loads_as_plain_data(tmp_path):
    folder = tmp_path / "math"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "1+1?", "reference": "2"}) + "\n")
    train, _ = data.load_examples(str(folder))
    assert train == [{"prompt": "1+1?", "reference": "2"}]


def test_mbpp_function_skips_keywords_builtins_and_imports():
    assert tasks.mbpp_function("assert (k(1)) == 2") == "k"
    assert tasks.mbpp_function("assert list(map(str, g(3))) == ['1']") == "g"
    assert tasks.mbpp_function("assert type(m(1)) == int") == "m"
    assert tasks.mbpp_function("assert Counter(c(1)) == 1", "from collections import Counter") == "c"
    assert tasks.mbpp_function("not python (") is None
    assert "named" not in tasks.mbpp_row({"test_list": []})["prompt"]
