"""backend='trl': NMGRPO inside TRL's GRPOTrainer on the tiny model, 2 steps a run."""
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import api
import config
import tasks
import logs
import tools
import train
import trl_backend

LENGTH = [{"type": "length", "params": {"target_length": 3}}]  # varies on a random model: the loss has a gradient


def make(small, **kw):
    return config.make(**{**small, "backend": "trl", "eval_size": 0, "log_completions": False, "rewards": LENGTH,
                          "log_level": "WARNING", **kw})


def checkpoint_folders(folder):
    return [d for d in os.listdir(folder) if d.startswith("checkpoint-")]


def rows(cfg):
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kind", ["neural_mirror", "kl", "prob_l2", "none"])
def test_two_steps_on_each_divergence_against_a_frozen_reference(small, tiny_dir, kind):
    cfg = make(small, divergence_type=kind)
    trainer = trl_backend.build_trainer(cfg)
    trainer.train()
    logged = rows(cfg)
    assert [r["step"] for r in logged] == [1, 2] and all(r["grad_norm"] > 0 for r in logged)
    name = logs.DIVERGENCE_METRIC[kind]
    assert all((name in r) == (kind != "none") for r in logged)
    if kind == "none":
        assert trainer.ref_model is None
        return
    from transformers import AutoModelForCausalLM
    initial = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    ref, policy = trainer.ref_model.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(ref[k], initial[k]) for k in initial)  # the reference is the initial weights
    assert max((policy[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # the policy moved


def test_lora_reference_is_the_base_and_bregman_grows_once_the_policy_moved(small, tiny_dir):
    cfg = make(small, use_lora=True, lora_r=4, lora_alpha=8, learning_rate=0.05)
    trainer = trl_backend.build_trainer(cfg)
    trainer.train()
    first, second = rows(cfg)
    assert first["bregman"] == 0 and second["bregman"] > 0  # B = 0 at step 1: the policy is the base
    assert trainer.ref_model is None  # no copy: the reference is the same model with its adapters off
    batch = {"prompt_ids": torch.tensor([[5, 6, 7]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
             "completion_ids": torch.tensor([[8, 9, 10, 11]]), "completion_mask": torch.ones(1, 4, dtype=torch.long)}
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits[:, 2:-1] / cfg.temperature
        base = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None])[..., 0]
        ref = trainer._reference_logps(batch)
        policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 4)[0]
    assert torch.allclose(ref, base, atol=1e-5) and not torch.allclose(policy, base, atol=1e-4)


def test_the_regulariser_is_added_to_trls_loss(small):
    runs = [make(small, use_lora=True, lora_r=4, lora_alpha=8, learning_rate=0.05, divergence_type="kl", beta=beta,
                 loss_type="bnpo", output_dir=f"{small['output_dir']}-{beta}") for beta in (0.0, 100.0)]
    for cfg in runs:
        train.train(cfg)
    (a1, a2), (b1, b2) = rows(runs[0]), rows(runs[1])
    assert a1["loss"] == b1["loss"] and a1["kl"] == b1["kl"] == 0  # the policy is the base at step 1
    assert a2["kl"] == b2["kl"] > 0  # the same update, so the same step 2; only the loss differs
    assert b2["loss"] - a2["loss"] == pytest.approx(100.0 * b2["kl"], rel=1e-4)  # bnpo: both are token means


def test_lora_checkpoints_hold_the_adapter_alone(small, tmp_path):
    out = train.train(make(small, use_lora=True, lora_r=4, lora_alpha=8, save_steps=1, save_total_limit=1))
    assert out["steps"] == 2 and out["checkpoint"].endswith("checkpoint-2")
    files = os.listdir(out["checkpoint"])
    assert {"adapter_config.json", "adapter_model.safetensors", "mirror.safetensors"} <= set(files)
    assert "model.safetensors" not in files and len(checkpoint_folders(out["output_dir"])) == 1
    assert len(load_file(os.path.join(out["checkpoint"], "adapter_model.safetensors"))) == 2 * 4 * 2  # A, B x 4 x 2 layers
    tools.merge(out["checkpoint"], str(tmp_path / "merged"))  # PEFT's layout: python tools.py merge works
    assert os.path.isfile(tmp_path / "merged" / "model.safetensors")


def test_rewards_receive_references_and_row_columns(small):
    calls = []

    def spy(text, reference=None, **kwargs):
        calls.append((reference, kwargs))
        return float(len(text.split()))

    cfg = make(small, dataset_name="toy", max_samples=40, rewards=[{"type": spy, "weight": 0.5}],
               processing_fn=lambda row: {**row, "answer_copy": row["answer"]})
    train.train(cfg)
    assert len(calls) == cfg.max_steps * cfg.batch_size * cfg.num_generations
    for reference, kwargs in calls:
        assert {"prompt", "answer_copy"} <= kwargs.keys() and "text" not in kwargs and "reference" not in kwargs
        assert reference == tasks.extract_gsm8k(kwargs["answer_copy"]) and reference.isdigit()
        assert not kwargs["prompt"].startswith("<|im_start|>")  # the example's prompt, not the rendered text
    for i in range(0, len(calls), cfg.num_generations):  # the G completions of a prompt are scored with its row
        assert len({kw["prompt"] for _, kw in calls[i:i + cfg.num_generations]}) == 1


def test_knobs_map_onto_grpo_config(small):
    cfg = make(small, batch_size=4, num_generations=4, gradient_accumulation_steps=2, num_iterations=2,
               max_steps=5, epsilon=0.2, epsilon_high=0.28, warmup_ratio=0.1, loss_type="dapo", scale_rewards="none",
               save_steps=0, logging_steps=2)
    args = trl_backend.grpo_config(cfg, 5, torch.device("cpu"), None, [1.0, 0.5], has_eval=False)
    assert args.per_device_train_batch_size == 8 and args.gradient_accumulation_steps == 2  # completions per micro-batch
    assert args.generation_batch_size == 16 and args.num_generations == 4  # one sampling step: 4 prompts x 4
    assert args.max_steps == 10 and args.save_steps == 10 and args.logging_steps == 4  # optimizer updates
    assert (args.epsilon, args.epsilon_high, args.beta, args.reward_weights) == (0.2, 0.28, 0.0, [1.0, 0.5])
    assert (args.loss_type, args.scale_rewards, args.warmup_steps, args.bf16) == ("dapo", "none", 0.1, False)
    more = trl_backend.grpo_config(cfg, 5, torch.device("cpu"), None, [1.0], False, push_to_hub=False, min_p=0.1)
    assert more.min_p == 0.1  # a GRPOConfig field no knob sets passes through
    with pytest.raises(ValueError, match="'temperature' is set from the config's knobs"):
        trl_backend.grpo_config(cfg, 5, torch.device("cpu"), None, [1.0], False, temperature=0.5)
    with pytest.raises(ValueError, match="use_lora=False"):
        trl_backend.grpo_config(config.make(**{**vars(cfg), "use_lora": True}), 5, torch.device("cpu"), None, [1.0],
                                False, use_vllm=True)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_regulariser_is_aggregated_as_the_native_loss(small, loss_type):
    cfg = make(small, loss_type=loss_type)
    x, mask = torch.rand(8, 8), (torch.rand(8, 8) > 0.3).long()
    fake = SimpleNamespace(loss_type=loss_type, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
                           max_completion_length=cfg.max_completion_length, accelerator=SimpleNamespace(num_processes=1),
                           args=SimpleNamespace(steps_per_generation=1))
    ours = trl_backend.NMGRPOTrainer._aggregate(fake, x, mask, {"num_items_in_batch": mask.sum()})
    native = (x * train.token_weights(cfg, mask)).sum()
    assert torch.allclose(ours, native)


@pytest.mark.parametrize("bad, match", [({"torch_compile": True}, "torch_compile"),
                                        ({"distributed": "fsdp"}, "distributed")])
def test_a_knob_trl_cannot_honour_stops_before_writing(small, bad, match):
    cfg = make(small, **bad)
    with pytest.raises(ValueError, match=match):
        train.train(cfg)
    assert not os.path.exists(cfg.output_dir)


def test_missing_trl_names_the_install_line(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError
    monkeypatch.delitem(sys.modules, "trl_backend")
    with pytest.raises(ValueError, match='pip install "trl>='):
        train.train(make(small))


def test_create_rl_trainer_with_backend_trl(small):
    kw = {k: v for k, v in small.items() if k not in ("model_name", "dataset_name")}
    trainer = api.create_rl_trainer(model_name=small["model_name"], dataset_name=small["dataset_name"],
                                      algorithm="nmgrpo", backend="trl", use_peft=True, lora_r=4,
                                      log_completions=False, **kw)
    results = trainer.train()
    assert results["total_steps"] == 2 and os.path.isdir(results["model_path"])
    assert results["metrics"]["step"] == 2 and "eval/reward" in results["metrics"]  # evaluated at the end
    assert results["best_eval"]["step"] == 2 and "bregman" in results["metrics"]
    assert load_file(os.path.join(results["model_path"], "adapter_model.safetensors"))
    assert "eval/reward" in trainer.evaluate()  # the trained TRL trainer answers, no second setup
    saved = trainer.save_model(str(small["output_dir"]) + "-saved")
    assert {"adapter_model.safetensors", "mirror.safetensors"} <= set(os.listdir(saved))


def cli(small, out, *flags):
    return train.main(["--model", small["model_name"], "--dataset", small["dataset_name"], "--column_mapping",
                       json.dumps(small["column_mapping"]), "--output", out, "--device", "cpu", "--precision", "fp32",
                       "--eval_size", "0", "--max_steps", "2", "--batch_size", "2", "--num_generations", "4",
                       "--max_completion_length", "8", "--log_completions", "false", "--log_level", "WARNING",
                       "--backend", "trl", *flags])


def test_cli_runs_backend_trl_and_a_bad_knob_exits_2_with_one_line(small, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli(small, out) == 0
    assert [r["step"] for r in rows(SimpleNamespace(output_dir=out))] == [1, 2]
    capsys.readouterr()
    assert cli(small, str(tmp_path / "never"), "--torch_compile", "true") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torch_compile=True") and len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "never")


def test_aligntune_model_backend_trl_selects_this_backend():
    import compat
    assert compat.from_nested({"algo": "nmgrpo", "model": {"name_or_path": "m", "backend": "trl"}})["backend"] == "trl"


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_latest_continues_the_uninterrupted_run_bit_exactly(small, tmp_path, use_lora):
    import shutil
    whole = make(small, max_steps=3, save_steps=1, save_total_limit=3, use_lora=use_lora, lora_r=4, learning_rate=0.05)
    train.train(whole)
    cut = str(tmp_path / "cut")
    shutil.copytree(whole.output_dir, cut)
    shutil.rmtree(os.path.join(cut, "checkpoint-3"))
    out = train.train(config.make(**{**vars(whole), "output_dir": cut, "resume": "latest"}))
    assert out["steps"] == 3 and out["checkpoint"].endswith("checkpoint-3")
    a, b = rows(whole), rows(SimpleNamespace(output_dir=cut))
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "reward", "grad_norm", "bregman"):
        assert b[2][key] == a[2][key], (key, a[2], b[2])
