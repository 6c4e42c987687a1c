"""config.py: AlignTune defaults, .py/.json/.yaml files, flag parsing, one-line errors, the CLI surface."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import config
import configurator

ALIGNTUNE_DEFAULTS = dict(
    num_epochs=1, max_steps=1600, batch_size=16, num_generations=32, learning_rate=1e-5, max_seq_length=512,
    max_prompt_length=768, max_completion_length=256, temperature=0.8, top_p=0.9, mirror_coefficient=1e-4,
    mirror_init_scale=0.01, mirror_seed=42, divergence_type="neural_mirror", gradient_accumulation_steps=1,
    max_grad_norm=1.0, optimizer="adamw_torch", lr_scheduler="cosine", weight_decay=0.0, warmup_steps=10,
    precision="auto", output_dir="./output", epsilon=0.2, num_iterations=1,
)

PY_CONFIG = '''
import math
from math import sqrt

SCALE = 4
_private = "ignored"


def helper(x):
    return x * SCALE


def shout(completions, **kwargs):
    return [float(len(c)) for c in completions]


learning_rate = 3e-4 * math.sqrt(4) / sqrt(4)
batch_size = helper(2)
num_generations = 4
reward_functions = ["format", shout]
column_mapping = {"question": "prompt"}
eval_on_start = True
'''


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture
def py_config(tmp_path):
    return write(tmp_path / "run.py", PY_CONFIG)


def error_of(argv):
    with pytest.raises(ValueError) as info:
        configurator.load(argv)
    message = str(info.value)
    assert "\n" not in message, f"multi-line error: {message!r}"
    return message


# ------------------------------------------------------------------------------------------ defaults

def test_loading_config_py_itself_gives_aligntune_defaults(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = configurator.load(["--config", "config.py"])
    assert {k: getattr(cfg, k) for k in ALIGNTUNE_DEFAULTS} == ALIGNTUNE_DEFAULTS
    assert cfg == config.Config()


def test_no_arguments_gives_defaults():
    assert configurator.load([]) == config.Config()


# ------------------------------------------------------------------------------------------ files

def test_python_config_file(py_config):
    cfg = configurator.load(["--config", py_config])
    assert cfg.learning_rate == pytest.approx(3e-4)
    assert cfg.batch_size == 8
    assert cfg.num_generations == 4
    assert cfg.column_mapping == {"question": "prompt"}
    assert cfg.eval_on_start is True
    assert cfg.reward_functions[0] == "format"
    assert callable(cfg.reward_functions[1]) and cfg.reward_functions[1](["ab", "abc"]) == [2.0, 3.0]
    assert cfg.max_steps == 1600


def test_flags_override_file(py_config):
    cfg = configurator.load(["--config", py_config, "--learning_rate=1e-3", "--batch-size", "2"])
    assert cfg.learning_rate == 1e-3 and cfg.batch_size == 2 and cfg.num_generations == 4


def test_flags_before_config_still_win(py_config):
    cfg = configurator.load(["--batch_size=2", "--config", py_config])
    assert cfg.batch_size == 2


def test_json_config(tmp_path):
    path = write(tmp_path / "run.json", json.dumps({"learning_rate": 2e-5, "batch_size": 4, "top_p": 1,
                                                     "reward_functions": ["format", "length"]}))
    cfg = configurator.load(["--config", path, "--top_k", "5"])
    assert (cfg.learning_rate, cfg.batch_size, cfg.top_p, cfg.top_k) == (2e-5, 4, 1.0, 5)
    assert isinstance(cfg.top_p, float)
    assert cfg.reward_functions == ["format", "length"]


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config(tmp_path, suffix):
    pytest.importorskip("yaml")
    path = write(tmp_path / f"run{suffix}", "learning_rate: 0.00002\nbatch_size: 4\nloss_type: dapo\n"
                                            "column_mapping:\n  question: prompt\nreward_functions: [format]\n")
    cfg = configurator.load(["--config", path])
    assert (cfg.learning_rate, cfg.batch_size, cfg.loss_type) == (2e-5, 4, "dapo")
    assert cfg.column_mapping == {"question": "prompt"} and cfg.reward_functions == ["format"]


def test_yaml_exponent_float_without_dot(tmp_path):
    """`learning_rate: 1e-5` is how AlignTune YAMLs write it; PyYAML reads it as the string '1e-5'."""
    pytest.importorskip("yaml")
    path = write(tmp_path / "run.yaml", "learning_rate: 1e-5\nmirror_coefficient: 1e-4\n")
    cfg = configurator.load(["--config", path])
    assert (cfg.learning_rate, cfg.mirror_coefficient) == (1e-5, 1e-4)


# ------------------------------------------------------------------------------------------ flags

@pytest.mark.parametrize("argv, key, value", [
    (["--learning_rate=3e-5"], "learning_rate", 3e-5),
    (["--learning_rate", "3e-5"], "learning_rate", 3e-5),
    (["--learning-rate", "3e-5"], "learning_rate", 3e-5),
    (["--max-steps=7"], "max_steps", 7),
    (["--max_steps", "7.0"], "max_steps", 7),
    (["--top_k", "3"], "top_k", 3),
    (["--eval_on_start"], "eval_on_start", True),
    (["--eval_on_start", "--batch_size=2"], "eval_on_start", True),
    (["--eval-on-start=false"], "eval_on_start", False),
    (["--gradient_checkpointing", "yes"], "gradient_checkpointing", True),
    (["--enable_thinking", "none"], "enable_thinking", None),
    (["--enable_thinking=false"], "enable_thinking", False),
    (["--tokenizer_name=none"], "tokenizer_name", None),
    (["--max_samples=null"], "max_samples", None),
    (["--max_samples=10"], "max_samples", 10),
    (["--epsilon_high=0.28"], "epsilon_high", 0.28),
    (["--system_prompt", "Think step by step."], "system_prompt", "Think step by step."),
    (["--column_mapping", '{"question": "prompt", "answer": "reference"}'], "column_mapping",
     {"question": "prompt", "answer": "reference"}),
    (["--reward_functions=[\"format\", \"length\"]"], "reward_functions", ["format", "length"]),
    (["--reward_function_weights", "[1.0, 0.5]"], "reward_function_weights", [1.0, 0.5]),
    (["--rewards", '[{"type": "format", "weight": 2}]'], "rewards", [{"type": "format", "weight": 2}]),
])
def test_flag_forms(argv, key, value):
    got = getattr(configurator.load(argv), key)
    assert got == value and type(got) is type(value)


def test_later_flag_wins():
    assert configurator.load(["--batch_size=2", "--batch_size=4"]).batch_size == 4


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("argv, needles", [
    (["--learning_rat=1"], ["--learning_rat", "did you mean 'learning_rate'"]),
    (["--learning-rat", "1"], ["learning_rat", "did you mean 'learning_rate'"]),
    (["--num_generation=4"], ["num_generation", "did you mean 'num_generations'"]),
    (["--batch_size=abc"], ["batch_size", "'abc'", "integer"]),
    (["--max_steps=1.5"], ["max_steps", "1.5", "integer"]),
    (["--learning_rate=fast"], ["learning_rate", "number"]),
    (["--eval_on_start=maybe"], ["eval_on_start", "true or false"]),
    (["--batch_size"], ["batch_size", "needs a value"]),
    (["batch_size=2"], ["batch_size=2", "--key=value"]),
    (["--loss_type=dapoo"], ["loss_type", "'dapoo'", "did you mean 'dapo'"]),
    (["--divergence_type", "neural_mirorr"], ["divergence_type", "did you mean 'neural_mirror'"]),
    (["--optimizer=adamw_torc"], ["optimizer", "did you mean 'adamw_torch'"]),
    (["--precision=bf32"], ["precision", "'bf32'", "did you mean"]),
    (["--scale_rewards=grup"], ["scale_rewards", "did you mean 'group'"]),
    (["--lr_scheduler=cosin"], ["lr_scheduler", "did you mean 'cosine'"]),
    (["--num_generations=1"], ["num_generations", "at least 2"]),
    (["--learning_rate=-1e-5"], ["learning_rate", "positive"]),
    (["--learning_rate=0"], ["learning_rate", "positive"]),
    (["--learning_rate=nan"], ["learning_rate", "positive"]),
    (["--temperature=0"], ["temperature", "positive"]),
    (["--mirror_coefficient=-1e-4"], ["mirror_coefficient", ">= 0"]),
    (["--mirror_coefficient=nan"], ["mirror_coefficient", "finite"]),
    (["--epsilon_low=1.5"], ["epsilon_low", "[0, 1)"]),
    (["--epsilon_high=-0.1"], ["epsilon_high", "[0, 10)"]),
    (["--max_samples=0"], ["max_samples", "at least 1"]),
    (["--top_p=0"], ["top_p", "(0, 1]"]),
    (["--top_p=1.5"], ["top_p", "(0, 1]"]),
    (["--batch_size=0"], ["batch_size", "at least 1"]),
    (["--batch_size=2", "--num_generations=3", "--gradient_accumulation_steps=4"],
     ["gradient_accumulation_steps=4", "divide", "6"]),
    (["--config", "no/such/config.py"], ["no/such/config.py", "does not exist"]),
    (["--config"], ["config", "needs a value"]),
])
def test_flag_errors(argv, needles):
    message = error_of(argv)
    for needle in needles:
        assert needle in message


def test_divisible_gradient_accumulation_is_fine():
    assert configurator.load(["--batch_size=2", "--num_generations=3", "--gradient_accumulation_steps=3"]).batch_size == 2


@pytest.mark.parametrize("name, text, needles", [
    ("typo.py", "learnig_rate = 1e-3\n", ["learnig_rate", "did you mean 'learning_rate'"]),
    ("typo.json", '{"learnin_rate": 1e-3}', ["learnin_rate", "did you mean 'learning_rate'"]),
    ("typo.yaml", "num_generation: 4\n", ["num_generation", "did you mean 'num_generations'"]),
    ("str.json", '{"learning_rate": "fast"}', ["learning_rate", "float", "str"]),
    ("str.json", '{"learning_rate": "1e-5"}', ["learning_rate", "float"]),
    ("int.json", '{"batch_size": 2.5}', ["batch_size", "int"]),
    ("bool.json", '{"batch_size": true}', ["batch_size", "int"]),
    ("list.json", '{"column_mapping": ["question"]}', ["column_mapping", "dict"]),
    ("choice.yaml", "loss_type: dapoo\n", ["loss_type", "did you mean 'dapo'"]),
    ("bad.json", '{"learning_rate": 1e-5,', ["bad.json", "not valid JSON"]),
    ("bad.yaml", "learning_rate: [1\nbatch_size: 2\n", ["bad.yaml", "not valid YAML"]),
    ("list.yaml", "- 1\n- 2\n", ["list.yaml", "mapping"]),
    ("run.txt", "learning_rate = 1e-3\n", ["run.txt", ".py", ".json", ".yaml"]),
])
def test_file_errors(tmp_path, name, text, needles):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    message = error_of(["--config", write(tmp_path / name, text)])
    for needle in needles:
        assert needle in message


# ------------------------------------------------------------------------------------------ help / CLI

def test_describe_lists_every_field_with_its_doc():
    text = configurator.describe()
    for f in dataclasses.fields(config.Config):
        assert f"--{f.name}=" in text
        assert f.metadata["doc"] in text


def cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_help():
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    for knob in ("--learning_rate=1e-05", "--mirror_coefficient=0.0001", "--divergence_type='neural_mirror'",
                 "--num_generations=32", "--max_completion_length=256"):
        assert knob in proc.stdout


def test_cli_bad_flag_is_one_clean_line():
    proc = cli("--learning_rat=1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "did you mean 'learning_rate'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_fsdp_refuses_fp16():
    with pytest.raises(ValueError, match="precision='fp16' with distributed='fsdp'"):
        config.make(distributed="fsdp", precision="fp16")
