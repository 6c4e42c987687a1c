"""Coming from AlignTune: its names on every surface, its defaults, its CLI flags, its examples as written (sizes
shrunk, local model and data), and a console the run owns."""
import json

import pytest
import torch

import compat
import config
import configurator
import train
from api import create_rl_trainer
from mirror import divergence

# the section of AlignTune's nested schema where each group of knobs naturally lives
SECTION = {"model": "model", "lora": "model", "data": "datasets", "logging": "logging"}


def _sample(name):
    """A value of the field that passes validation: its default, or a stand-in where the default is None."""
    f = config.FIELDS[name]
    default = f.default_factory() if callable(f.default_factory) else f.default
    stand_in = {"tokenizer_name": "tok", "eval_split": "test", "max_samples": 10, "system_prompt": "Be brief.",
                "cache_dir": "cache", "processing_fn": "json:loads", "data_seed": 7, "epsilon_low": 0.1,
                "epsilon_high": 0.3, "enable_thinking": True, "reward_functions": ["length"],
                "reward_function_weights": [1.0], "rewards": None, "run_name": "r", "wandb_project": "p",
                "resume": None, "mirror_path": None, "chat_template": "none"}
    return stand_in.get(name, default)


@pytest.mark.parametrize("name", list(config.FIELDS))
def test_every_knob_is_reachable_from_every_surface(name, tmp_path):
    value = _sample(name)
    group = config.FIELDS[name].metadata["group"]
    section = SECTION.get(group, "train")
    nested = {"algo": "nmgrpo", section: [{name: value}] if section == "datasets" else {name: value}}
    assert compat.from_nested(nested, config.FIELDS)[name] == value
    assert compat.from_nested({"algo": "nmgrpo", name: value}, config.FIELDS)[name] == value  # top level too
    py = tmp_path / "run.py"
    py.write_text(f"{name} = {value!r}\n")
    assert configurator.read_file(str(py))[name] == value
    text = "none" if value is None else json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
    assert configurator.parse_args([f"--{name}={text}"])[1][name] == value
    assert getattr(create_rl_trainer(**{"model_name": "m", "dataset_name": "d", name: value}).cfg, name) == value


@pytest.mark.parametrize("surface", ["api", "yaml", "cli", "py"])
def test_wandb_run_name_is_run_name_everywhere(surface, tmp_path):
    if surface == "api":
        cfg = create_rl_trainer(model_name="m", dataset_name="d", wandb_run_name="exp-1").cfg
    elif surface == "yaml":
        path = tmp_path / "run.yaml"
        path.write_text("algo: nmgrpo\nmodel: {name_or_path: m}\nlogging: {wandb_run_name: exp-1}\n")
        cfg = configurator.load(["--config", str(path)])
    elif surface == "cli":
        cfg = configurator.load(["--wandb-run-name", "exp-1"])
    else:
        path = tmp_path / "run.py"
        path.write_text("wandb_run_name = 'exp-1'\n")
        cfg = configurator.load(["--config", str(path)])
    assert cfg.run_name == "exp-1"
    with pytest.raises(ValueError, match="already set"):
        create_rl_trainer(model_name="m", dataset_name="d", wandb_run_name="a", run_name="b")


def test_the_same_validation_on_every_surface(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: nmgrpo\ntrain: {top_k: -1}\n")
    messages = set()
    for make in (lambda: config.make(top_k=-1), lambda: configurator.load(["--top_k=-1"]),
                 lambda: configurator.load(["--config", str(path)]),
                 lambda: create_rl_trainer(model_name="m", dataset_name="d", top_k=-1)):
        with pytest.raises(ValueError) as err:
            make()
        messages.add(str(err.value))
    assert messages == {"top_k=-1 must be >= 0"}


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_distributed_backend_of_the_yaml(backend, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"algo: nmgrpo\ndistributed: {{backend: {backend}, nodes: 1, gpus_per_node: 1, seed: 3}}\n")
    cfg = configurator.load(["--config", str(path)])
    assert (cfg.distributed, cfg.seed) == (backend, 3)
    path.write_text("algo: nmgrpo\ndistributed: {backend: single}\n")  # one process: the default
    assert configurator.load(["--config", str(path)]).distributed == "ddp"


def test_distributed_process_count_is_checked_against_torchrun(tmp_path, monkeypatch):
    nested = {"algo": "nmgrpo", "distributed": {"backend": "ddp", "nodes": 1, "gpus_per_node": 2}}
    with pytest.raises(ValueError, match="torchrun --nnodes 1 --nproc_per_node 2"):
        compat.from_nested(nested, config.FIELDS)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert compat.from_nested(nested, config.FIELDS)["distributed"] == "ddp"
    backend_only = {"algo": "nmgrpo", "distributed": {"backend": "fsdp"}}  # the processes are torchrun's to say
    assert compat.from_nested(backend_only, config.FIELDS)["distributed"] == "fsdp"


def test_percent_is_folded_once_into_the_final_split(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: nmgrpo\ndatasets: [{name: d, split: test}]\n")
    assert create_rl_trainer(config=str(path), percent=10).cfg.split == "test[:10%]"
    assert configurator.load(["--config", str(path), "--percent", "10"]).split == "test[:10%]"
    path.write_text("algo: nmgrpo\ndatasets: [{name: d, percent: 10}]\n")
    assert configurator.load(["--config", str(path), "--split", "validation"]).split == "validation[:10%]"


def test_aligntune_cli_flags():
    _, flags = configurator.parse_args(["-m", "model", "-d", "data", "-o", "out", "--bf16", "--4bit",
                                        "--col-prompt", "question", "--col-answer", "answer", "--data-seed", "5"])
    assert flags == {"model_name": "model", "dataset_name": "data", "output_dir": "out", "precision": "bf16",
                     "load_in_4bit": True, "column_mapping": {"question": "prompt", "answer": "reference"},
                     "data_seed": 5}
    assert configurator.load(["--fp16=false"]).precision == "auto"  # false leaves the field as it was
    assert configurator.parse_args(["--8bit"])[1] == {"load_in_8bit": True}
    assert configurator.parse_args(["--fp16"])[1] == {"precision": "fp16"}
    assert configurator.load(["--percent", "10"]).split == "train[:10%]"
    assert configurator.load(["--split", "test", "--percent", "25"]).split == "test[:25%]"
    assert configurator.load(["--percent", "100"]).split == "train"
    assert configurator.parse_args(["--bf16", "-m", "x", "--4bit", "-o", "out"])[1] == {
        "precision": "bf16", "model_name": "x", "load_in_4bit": True, "output_dir": "out"}  # a switch, then -m
    for argv, message in ((["--percent", "0"], "whole number in [1, 100]"), (["--percent", "2.5"], "whole number"),
                          (["--split", "train[:5]", "--percent", "5"], "one slice"),
                          (["--verbose"], "unknown flag --verbose"), (["--bf17"], "did you mean 'bf16'"),
                          (["-x"], "unexpected argument '-x'"), (["--4bit=maybe"], "--4bit='maybe' is not true")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            configurator.load(argv)


def test_4bit_settings_without_4bit_say_they_do_nothing(logged):
    config.make(bnb_4bit_quant_type="fp4")
    config.make(bnb_4bit_quant_type="fp4")
    warned = [r.getMessage() for r in logged.records if "bnb_4bit_quant_type" in r.getMessage()]
    assert len(warned) == 1 and "without load_in_4bit=True they do nothing" in warned[0]


def test_aligntune_defaults():
    cfg = config.Config()
    assert (cfg.enable_thinking, cfg.loss_type) == (False, "dapo")
    lp, lr = torch.tensor([-0.1, -2.0]), torch.tensor([-0.3, -0.5])
    assert torch.allclose(divergence("prob_l2", lp, lr, coef=0.5), 0.5 * (lp.exp() - lr.exp()) ** 2)


QWEN3_THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.mark.parametrize("thinking, empty_think_block", [(False, True), (None, False), (True, False)])
def test_thinking_is_off_unless_asked(thinking, empty_think_block, small):
    overrides = {} if thinking is False else {"enable_thinking": thinking}  # False: the default
    run = train.setup(config.make(**small, chat_template=QWEN3_THINKING, **overrides))
    assert run.train_set[0]["text"].endswith("<think>\n\n</think>\n\n") == empty_think_block


def test_code_rewards_on_math_data_run_with_one_warning(small, logged):
    rewards = [{"type": "math_correctness"}, {"type": "code_correctness", "weight": 0.4}, {"type": "code_quality"}]
    out = train.fit(train.setup(config.make(**small, rewards=rewards)))
    warnings = [r.getMessage() for r in logged.records if r.levelname == "WARNING" and "code_correctness" in
                r.getMessage()]
    assert len(warnings) == 1 and "test_list or test_cases" in warnings[0] and "scores 0.0" in warnings[0]
    assert out["metrics"]["rewards/code_correctness"] == 0.0 and "rewards/code_quality" in out["metrics"]
    train.setup(config.make(**{**small, "rewards": rewards, "output_dir": "again"}))  # an ES inner run, say
    assert len([r for r in logged.records if "code_correctness" in r.getMessage()]) == 1  # once per process
    with pytest.raises(ValueError, match="every reward would score 0.0"):
        train.setup(config.make(**{**small, "reward_functions": ["code_correctness"], "output_dir": "elsewhere"}))


def test_the_console_is_the_runs_while_it_trains(small, capfd):
    cfg = config.make(**{**small, "save_steps": 1, "max_steps": 2})
    train.fit(train.setup(cfg))
    out, err = capfd.readouterr()
    assert "checkpoint" in out
    for bar in ("Writing model shards", "Loading weights", "Loading checkpoint shards"):
        assert bar not in out + err, bar


def add_hint(row):
    """A processing_fn of one row, as AlignTune's examples write them."""
    return {**row, "question": row["question"] + " Answer after ####."}


def test_an_aligntune_example_as_written(tiny_dir, toy_rows, tmp_path, logged):
    """GSM8K-shaped local data with its own test split, one percent-like slice of 75 rows, batch 16, the example's
    names (wandb_run_name, processing_fn with processing_batched=False, use_peft) and its code rewards on math data."""
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for name, rows in (("train", toy_rows[:150]), ("test", toy_rows[150:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = create_rl_trainer(
        model_name=tiny_dir, dataset_name=str(folder), split="train[:50%]", algorithm="nmgrpo", max_steps=1,
        batch_size=16, num_generations=2, max_completion_length=4, learning_rate=1e-5, use_peft=True, lora_r=4,
        wandb_run_name="gsm8k-example", processing_fn=add_hint, processing_batched=False, device="cpu",
        precision="fp32", output_dir=str(tmp_path / "out"),
        rewards=[{"type": "math_correctness", "weight": 1.0}, {"type": "code_correctness", "weight": 0.4}])
    results = trainer.train()
    run = trainer.run
    assert (len(run.train_set), len(run.eval_set)) == (75, 64)  # the whole slice trains; eval is the test split
    assert run.train_set[0]["prompt"].endswith("Answer after ####.") and trainer.cfg.run_name == "gsm8k-example"
    assert results["total_steps"] == 1 and "rewards/code_correctness" in results["metrics"]
    assert any("'test' split" in r.getMessage() for r in logged.records)
