"""Shared fixtures: a tiny Qwen3 and tokenizer saved to disk, and the toy task as a local jsonl file."""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import tasks  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread, and far slower when threads compete for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the warnings common.warn_once gives once per process."""
    common.warn_once.cache_clear()


@pytest.fixture
def logged(caplog, monkeypatch):
    """caplog with common.log's records (configure_logging stops them reaching the root logger caplog listens on)."""
    common.configure_logging()  # its handler in place first, which turns propagation off
    monkeypatch.setattr(common.log, "propagate", True)
    with caplog.at_level("INFO", logger="nmgrpo"):
        yield caplog


@pytest.fixture(scope="session")
def toy_rows():
    return tasks.toy_task(300, seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, toy_rows):
    """A random tiny Qwen3 (2 layers, hidden 64) and a BPE tokenizer with a ChatML template, on disk."""
    folder = str(tmp_path_factory.mktemp("tiny"))
    corpus = [r["question"] + "\n" + r["answer"] for r in toy_rows]
    return tiny.make_tiny(folder, corpus=corpus, vocab_size=512)


@pytest.fixture(scope="session")
def toy_file(tmp_path_factory, toy_rows):
    """The toy task as a local jsonl file with GSM8K's columns (question, answer)."""
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_rows))
    return str(path)


@pytest.fixture
def small(tiny_dir, toy_file, tmp_path):
    """Keyword arguments of a Config for a few fast CPU steps on the tiny model."""
    return dict(model_name=tiny_dir, dataset_name=toy_file, column_mapping={"question": "prompt", "answer": "reference"},
                eval_size=8, batch_size=2, num_generations=4, max_steps=2, max_completion_length=8,
                max_prompt_length=64, learning_rate=1e-3, warmup_steps=0, eval_steps=0, save_steps=0,
                logging_steps=1, output_dir=str(tmp_path / "out"), device="cpu", precision="fp32")
