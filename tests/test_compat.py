"""AlignTune's ways in (YAML schema, CLI flags, create_rl_trainer), the bad-config catalogue, and the ways out."""
import json
import os

import pytest
import yaml

import compat
import config
import configurator
import tools
import train
from test_data import MBPP_ROWS

# AlignTune's NMGRPO README example, as written there but for the model, the data and the run's length
README_YAML = """
algo: nmgrpo
model:
  name_or_path: "{model}"
  precision: auto
  gradient_checkpointing: true
  max_seq_length: 512
  use_peft: true
  lora_r: 64
  lora_alpha: 64
  lora_dropout: 0.05
  lora_target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
datasets:
  - name: "{data}"
    split: "train"
    system_prompt: "You are a helpful Python tutor."
train:
  epochs: 3
  max_steps: 2
  per_device_batch_size: 2
  learning_rate: 0.00001
  num_generations: 4
  gradient_accumulation_steps: 2
  mirror_coefficient: 0.0001
  mirror_init_scale: 0.01
  mirror_seed: 42
  divergence_type: "neural_mirror"
  optimizer: "adamw_torch"
  lr_scheduler: "cosine"
  weight_decay: 0.0
  warmup_steps: 10
  max_grad_norm: 1.0
  max_prompt_length: 128
  max_completion_length: 16
  temperature: 0.8
  top_p: 0.9
  rewards:
    - type: "code_quality"
      weight: 0.3
      params: {{}}
    - type: "code_correctness"
      weight: 0.4
      params: {{}}
    - type: "length"
      weight: 0.15
      params:
        min_length: 20
        max_length: 256
    - type: "diversity"
      weight: 0.15
      params: {{}}
logging:
  output_dir: "{out}"
  run_name: "nmgrpo_neural_mirror_gsm8k"
  loggers: ["jsonl"]
  logging_steps: 1
  save_steps: 100
  eval_steps: 100
distributed:
  backend: single
caching:
  root: "{cache}"
  enabled: true
chat_template: auto
"""


@pytest.fixture
def mbpp_dir(tmp_path):
    folder = tmp_path / "mbpp"
    folder.mkdir()
    rows = [dict(r, task_id=r["task_id"] + 100 * k, text=f"{r['text']} ({k})") for k in range(6) for r in MBPP_ROWS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def write_yaml(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_readme_yaml_runs_with_its_rewards_and_mirror_keys(tmp_path, tiny_dir, mbpp_dir):
    out = str(tmp_path / "out")
    path = write_yaml(tmp_path, README_YAML.format(model=tiny_dir, data=mbpp_dir, out=out, cache=tmp_path / "cache"))
    cfg = configurator.load(["--config", path])
    assert (cfg.use_lora, cfg.lora_r, cfg.gradient_checkpointing, cfg.batch_size, cfg.num_epochs) == (True, 64, True, 2, 3)
    assert (cfg.mirror_coefficient, cfg.mirror_init_scale, cfg.mirror_seed) == (1e-4, 0.01, 42)
    assert [r["type"] for r in cfg.rewards] == ["code_quality", "code_correctness", "length", "diversity"]
    assert cfg.output_dir == out and cfg.run_name == "nmgrpo_neural_mirror_gsm8k" and cfg.loggers == ["jsonl"]
    assert train.main(["--config", path, "--eval_size", "2"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("code_quality", "code_correctness", "length", "diversity"):
        assert f"rewards/{name}" in rows[-1]
    assert "bregman" in rows[-1]


def test_flags_override_the_yaml_and_alignTune_flag_names_work(tmp_path, tiny_dir, mbpp_dir):
    path = write_yaml(tmp_path, README_YAML.format(model=tiny_dir, data=mbpp_dir, out=tmp_path / "o", cache="c"))
    cfg = configurator.load(["--config", path, "--batch-size", "4", "--lr=3e-5", "--max-steps", "7", "--use-peft", "false",
                       "--reward-functions", "length,diversity", "--reward-function-weights", "0.5,0.5",
                       "--rewards", "null", "--mirror-coefficient", "0.002", "--mirror-init-scale=0.05",
                       "--mirror-seed", "3", "--divergence-type", "kl", "--lora-targets", "q_proj,v_proj",
                       "--loggers", "jsonl", "--output", str(tmp_path / "o2"), "--max-length", "256",
                       "--epochs", "2", "--type", "nmgrpo", "--precision", "fp32", "--split", "train[:10]"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.max_steps, cfg.use_lora) == (4, 3e-5, 7, False)
    assert cfg.reward_functions == ["length", "diversity"] and cfg.reward_function_weights == [0.5, 0.5]
    assert (cfg.mirror_coefficient, cfg.mirror_init_scale, cfg.mirror_seed, cfg.divergence_type) == (0.002, 0.05, 3, "kl")
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.max_seq_length == 256 and cfg.num_epochs == 2
    assert cfg.output_dir == str(tmp_path / "o2") and cfg.split == "train[:10]"
    assert configurator.load(["--type", "grpo"]).divergence_type == "kl"
    assert configurator.load(["--algo", "drgrpo"]).loss_type == "dr_grpo"


def test_aligntune_column_mapping_is_role_to_column():
    assert compat.column_mapping({"prompt": "question", "text": "answer"}) == {"question": "prompt", "answer": "reference"}
    assert compat.column_mapping({"question": "prompt"}) == {"question": "prompt"}  # ours passes through


def test_shipped_yaml_loads():
    cfg = config.make(configurator.read_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                                    "nmgrpo_gsm8k.yaml")))
    assert cfg.model_name == "Qwen/Qwen3-1.7B" and cfg.use_lora and cfg.column_mapping == {"question": "prompt",
                                                                                              "answer": "reference"}
    assert [r["type"] for r in cfg.rewards] == ["math_correctness", "length"] and cfg.loggers == ["tensorboard"]


def test_create_rl_trainer_returns_aligntune_results(small):
    from api import create_rl_trainer
    kw = {k: v for k, v in small.items() if k not in ("model_name", "dataset_name")}
    trainer = create_rl_trainer(model_name=small["model_name"], dataset_name=small["dataset_name"],
                                algorithm="nmgrpo", num_epochs=1, use_peft=False, **kw)
    results = trainer.train()
    for key in ("training_time", "final_loss", "total_steps", "model_path", "metrics", "num_reward_functions",
                "mirror_coefficient", "mirror_init_scale", "divergence_type", "output_dir", "checkpoint"):
        assert key in results, key
    assert results["total_steps"] == 2 and os.path.isdir(results["model_path"])
    assert "eval/reward" in trainer.evaluate()
    with pytest.raises(ValueError, match="this trainer runs"):
        create_rl_trainer(model_name="m", dataset_name="d", algorithm="dpo")


# ----------------------------------------------------------------------------- the bad-config catalogue

BAD_FLAGS = [
    (["--learning_rat=1e-3"], "did you mean 'learning_rate'"),
    (["--batch_size=two"], "batch_size"),
    (["--learning_rate=-1"], "learning_rate"),
    (["--num_generations=1"], "num_generations"),
    (['--reward_functions=["length","math_correctness"]', "--reward_function_weights=[1.0]"], "reward_function_weights"),
    (["--mirror_coefficient=-0.1"], "mirror_coefficient"),
    (["--mirror_init_scale=-1"], "mirror_init_scale"),
    (["--reward_functions=lenght"], "did you mean 'length'"),
    (["--divergence_type=neural_miror"], "did you mean 'neural_mirror'"),
    (["--loss_type=grp"], "loss_type"),
    (["--lr_scheduler=cosin"], "lr_scheduler"),
    (["--optimizer=adamw_torc"], "optimizer"),
    (["--precision=bf32"], "precision"),
    (['--column_mapping={"nope": "prompt"}'], "column"),
    (["--dataset_name=./missing.jsonl"], "dataset_name"),
    (["--model_name=./missing_model"], "model_name"),
    (["--model_name=someone/not-on-this-machine"], "model_name"),
    (["--max_prompt_length=1500", "--max_completion_length=1500", "--max_seq_length=4000"], "context"),
    (["--precision=fp16"], "fp16"),
    (["--resume=./no-checkpoint-here"], "resume"),
    (["--top_p=1.5"], "top_p"),
    (["--temperature=0"], "temperature"),
    (["--epsilon_low=1.5"], "epsilon_low"),
    (["--loggers=tensorbord"], "did you mean 'tensorboard'"),
    (['--rewards=[{"type": "length", "params": {"max_len": 3}}]'], "max_len"),
    (["--use_lora=true", "--lora_target_modules=q_prj"], "did you mean"),
    (["--use_lora=true", "--lora_r=0"], "lora_r"),
    (["--config=no-such-file.yaml"], "does not exist"),
    (["--foo=1"], "unknown flag --foo"),
    (["--reward_functions=code_correctness"], "test_list"),
    (["--warmup_ratio=1.5"], "warmup_ratio"),
    (["--batch_size"], "needs a value"),
    (["--save_total_limit=0"], "save_total_limit"),
    (["--type=dpo"], "this trainer runs"),
    (["--log_level=LOUD"], "log_level"),
    (["--chat_template=chatml"], "chat_template"),
]
BAD_YAML = [
    ("model: {name_or_path: m}\ntrain: {learning_rate: [1e-5\n", "not valid YAML"),
    ("algo: nmgrpo\nmodel: {name_or_path: m}\nmodle: {}\n", "did you mean 'model'"),
    ("algo: nmgrpo\nmodel: {name_or_path: m}\ntrain: {learnin_rate: 0.1}\n", "train.learnin_rate"),
    ("algo: nmgrpo\nmodel: {name_or_path: m}\ndistributed: {backend: horovod}\n", "distributed='horovod'"),
    ("algo: nmgrpo\ndistributed: {backend: ddp, nodes: 2, gpus_per_node: 4}\n", "torchrun --nnodes 2 --nproc_per_node 4"),
    ("algo: nmgrpo\ntrain: {top_k: -1}\n", "top_k=-1 must be >= 0"),
    ("algo: nmgrpo\ntrain: {es_populaton: 4}\n", "did you mean 'es_population'"),
    ("algo: nmgrpo\ndatasets: [{name: d, split: 'train[:10]', percent: 5}]\n", "give one slice"),
    ("algo: dpo\nmodel: {name_or_path: m}\n", "algo='dpo'"),
    ("algo: nmgrpo\nmodel: {name_or_path: m}\ndatasets: [{name: a}, {name: b}]\n", "exactly one dataset"),
    ("algo: nmgrpo\nmodel: {name_or_path: m, trust_remote_code: maybe}\n", "model.trust_remote_code"),
    ("algo: nmgrpo\nmodel: {name_or_path: m}\ntrain: {rewards: [{type: length}]}\nrewards: [{type: length}]\n",
     "both at the top level and under train"),
    ("algo: nmgrpo\nlogging: {loggers: 5}\n", "logging.loggers"),
    ("algo: nmgrpo\ndatasets: [{name: d, column_mapping: {prompt: [a, b]}}]\n", "column_mapping"),
    ("algo: nmgrpo\nlogging: {sample_logging: {enabled: true, temperature: 0.3}}\n", "sample_logging.temperature"),
    ("algo: nmgrpo\nmodel: {name_or_path: m, backend: trl}\nbackend: native\n", "disagree"),
]


def _expect_clean_failure(argv, small, tmp_path, capsys, message):
    out = str(tmp_path / "never")
    base = ["--model_name", small["model_name"], "--dataset_name", small["dataset_name"], "--column_mapping",
            json.dumps(small["column_mapping"]), "--output_dir", out, "--device", "cpu", "--precision", "fp32",
            "--eval_size", "8", "--max_steps", "1"]
    assert train.main(base + argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err  # progress bars aside
    assert message in errors[0], err
    assert not os.path.exists(out)


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[a[0][:40] for a, _ in BAD_FLAGS])
def test_bad_flags_fail_with_one_line_and_write_nothing(argv, message, small, tmp_path, capsys):
    _expect_clean_failure(argv, small, tmp_path, capsys, message)


@pytest.mark.parametrize("text, message", BAD_YAML, ids=[m for _, m in BAD_YAML])
def test_bad_yaml_fails_with_one_line_and_writes_nothing(text, message, small, tmp_path, capsys):
    path = write_yaml(tmp_path, text)
    _expect_clean_failure(["--config", path], small, tmp_path, capsys, message)


# ----------------------------------------------------------------------------- ways out

def test_plot_summary_table_and_tensorboard(small, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    loggers = ["tensorboard"] if _has("tensorboard") else []
    cfg = config.make(**{**small, "rewards": [{"type": "length", "params": {"target_length": 3}}], "loggers": loggers})
    train.train(cfg)
    logged = capsys.readouterr().out
    assert "done: 2 steps" in logged and "checkpoint:" in logged  # the run summary
    assert "completion" in logged and "adv" in logged  # the completions table
    assert tools.main(["plot", cfg.output_dir]) == 0
    pngs = sorted(os.listdir(os.path.join(cfg.output_dir, "plots")))
    assert "reward.png" in pngs and "lr.png" in pngs
    with open(os.path.join(cfg.output_dir, "plots", "reward.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "samples.jsonl"))]
    assert len(samples) == cfg.max_steps * cfg.batch_size * cfg.num_generations  # every rollout
    assert {"rewards", "advantage"} <= samples[0].keys()
    if loggers:
        assert os.listdir(os.path.join(cfg.output_dir, "tensorboard"))
    assert tools.main(["plot", str(tmp_path / "nothing")]) == 2


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_yaml_example_parses_as_yaml():
    assert yaml.safe_load(README_YAML.format(model="m", data="d", out="o", cache="c"))["algo"] == "nmgrpo"


def test_json_in_the_nested_schema_and_report_to(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"algo": "grpo", "model": {"name_or_path": "m", "use_peft": False},
                                "train": {"per_device_batch_size": 3, "kl_coef": 0.05},
                                "logging": {"loggers": ["tensorboard"], "report_to": "none"}}))
    cfg = configurator.load(["--config", str(path)])
    assert (cfg.model_name, cfg.batch_size, cfg.beta, cfg.divergence_type, cfg.loggers) == ("m", 3, 0.05, "kl",
                                                                                          ["tensorboard"])


def test_help_lists_every_knob_and_the_aliases(capsys):
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in config.FIELDS:
        assert f"--{f}=" in out, f
    for alias in ("--lr (learning_rate)", "--type/--algo", "--wandb-run-name (run_name)", "--bf16 (precision='bf16')",
                  "--4bit (load_in_4bit=True)", "--col-prompt COLUMN", "--percent P", "-m (--model)"):
        assert alias in out, alias


def test_review_cases_epochs_bare_flags_paths_and_priorities(tmp_path, small):
    assert configurator.load(["--use-peft", "--use-gradient-checkpointing"]).use_lora is True
    assert configurator.load(["--epochs", "2"]).max_steps == -1 and configurator.load(["--epochs", "2", "--max-steps", "5"]).max_steps == 5
    y = write_yaml(tmp_path, "algo: grpo\ntrain: {epochs: 2}\nlogging: {sample_logging: true}\n")
    cfg = configurator.load(["--config", y])
    assert (cfg.num_epochs, cfg.max_steps, cfg.divergence_type, cfg.log_completions) == (2, -1, "kl", True)
    assert configurator.load(["--config", y, "--type", "nmgrpo"]).divergence_type == "neural_mirror"
    assert configurator.load(["--config", y, "--type", "dapo", "--divergence-type", "kl"]).divergence_type == "kl"
    only_logging = write_yaml(tmp_path, "logging: {output_dir: here}\n", "override.yaml")
    assert configurator.load(["--config", only_logging]).output_dir == "here"
    import pathlib
    from api import create_rl_trainer
    t = create_rl_trainer(config=pathlib.Path(y), num_epochs=1, column_mapping={"prompt": "question", "text": "answer"})
    assert t.cfg.column_mapping == {"question": "prompt", "answer": "reference"} and t.cfg.max_steps == -1
    assert t.cfg.divergence_type == "kl"  # the file's algo wins over the default algorithm
    run = create_rl_trainer(**{**small, "rewards": [{"type": "length"}], "max_steps": 1})
    run.train()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        run.save_model(str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "notes.txt").exists()
    saved = run.save_model(str(tmp_path / "saved"))
    assert os.path.isfile(os.path.join(saved, "trainer_state.json"))
