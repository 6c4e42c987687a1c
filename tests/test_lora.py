"""lora.py: identity at init, adapters off = base, PEFT file-format parity both ways, merged export (tools.py), bf16."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
import tools


def load(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def ids_for(model):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def randomize_b(model, seed=1, std=0.05):
    """Non-zero B (PEFT's keys end in lora_B.default.weight, ours in lora_B) so the adapters matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_identity_at_init_and_adapters_off(tiny_dir):
    model = load(tiny_dir)
    ids = ids_for(model)
    base = logits(model, ids)
    lora.inject(model, r=4, alpha=8)
    assert torch.equal(logits(model, ids), base)  # B = 0
    randomize_b(model)
    adapted = logits(model, ids)
    assert (adapted - base).abs().max() > 1e-3
    layers = list(lora.lora_layers(model).values())
    layers[0].enabled = False  # a switch already off stays off after the block
    with lora.adapters_off(model) as m:
        assert m is model and not any(x.enabled for x in layers)
        assert torch.equal(logits(model, ids), base)
    assert [x.enabled for x in layers] == [False] + [True] * (len(layers) - 1)
    layers[0].enabled = True
    assert torch.equal(logits(model, ids), adapted)
    with pytest.raises(KeyError), lora.adapters_off(model):
        raise KeyError("boom")
    assert all(x.enabled for x in layers)
    assert torch.equal(logits(model, ids), adapted)
    with pytest.raises(ValueError, match="no LoRA adapters"), lora.adapters_off(load(tiny_dir)):
        pass


def test_only_lora_trains_and_counts(tiny_dir):
    model = load(tiny_dir)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = lora.inject(model, r=4, alpha=8)
    assert not any(m.training for m in lora.lora_layers(model).values())  # eval model: no dropout
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    params = lora.lora_parameters(model)
    assert len(params) == 16 and all(p.dtype == torch.float32 for _, p in params)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in params}
    n_lora = sum(p.numel() for _, p in params)
    assert n_lora == sum(4 * (i + o) for n, (i, o) in shapes.items() if n in names) == 2 * 4 * (128 + 96 + 96 + 128)
    assert model.lm_head.weight is model.model.embed_tokens.weight and isinstance(model.lm_head, nn.Linear)
    randomize_b(model)
    model(input_ids=ids_for(model)).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert lora.is_lora(model) and not lora.is_lora(load(tiny_dir))


def test_all_linear_targets_every_linear_but_lm_head(tiny_dir):
    model = load(tiny_dir)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = lora.inject(model.train(), targets="all-linear", r=2, alpha=2)
    assert all(m.training for m in lora.lora_layers(model).values())  # a wrapper keeps the module's mode
    assert sorted(names) == sorted(n for n in linears if n != "lm_head") and len(names) == 14
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_bad_arguments(tiny_dir):
    model = load(tiny_dir)
    with pytest.raises(ValueError, match=r"\['v_prj'\].*did you mean.*'v_proj'"):
        lora.inject(model, targets=("q_proj", "v_prj"))
    with pytest.raises(ValueError, match="output embedding"):
        lora.inject(model, targets=("lm_head",))
    for kwargs in [dict(r=0), dict(r=2.5), dict(r=True), dict(alpha=0), dict(alpha=-1.0), dict(dropout=1.0),
                   dict(dropout=-0.1), dict(targets="q_proj"), dict(targets=())]:
        with pytest.raises(ValueError):
            lora.inject(model, **kwargs)
    assert not lora.is_lora(model) and all(p.requires_grad for p in model.parameters())  # nothing half-done
    lora.inject(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.inject(model)


@pytest.mark.parametrize("rslora, scaling", [(False, 8 / 16), (True, 8 / 4)])
def test_scaling_and_forward_formula(rslora, scaling):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True)
    layer = lora.LoRALinear(base, r=16, alpha=8, dropout=0.5, rslora=rslora).eval()
    assert layer.scaling == scaling
    assert -1 / math.sqrt(6) <= layer.lora_A.min() and layer.lora_A.max() <= 1 / math.sqrt(6)  # kaiming(a=sqrt(5))
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    expected = base(x) + x @ layer.lora_A.T @ layer.lora_B.T * scaling
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(tools._merged_linear(layer)(x), expected, rtol=0, atol=1e-5)  # what export saves
    assert not torch.equal(layer.train()(x), layer.eval()(x))  # dropout acts on the adapter path in training


def test_save_load_roundtrip_and_strictness(tiny_dir, tmp_path, monkeypatch):
    model = load(tiny_dir)
    ids = ids_for(model)
    lora.inject(model, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=16, dropout=0.1, rslora=True)
    randomize_b(model)
    lora.save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 16, 0.1, True)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["base_model_name_or_path"] == "tiny"
    fresh = load(tiny_dir)
    lora.load_adapter(fresh, tmp_path / "a")  # injects from the config
    assert lora.lora_layers(fresh).keys() == lora.lora_layers(model).keys()
    assert torch.equal(logits(fresh, ids), logits(model, ids))

    def crash(tensors, path, metadata=None):
        open(path, "w").write("half a file")
        raise OSError("disk full")
    randomize_b(model, seed=2)
    with monkeypatch.context() as patch, pytest.raises(OSError, match="disk full"):
        patch.setattr(lora, "save_file", crash)
        lora.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    again = load(tiny_dir)
    lora.load_adapter(again, tmp_path / "a")  # the previous adapter, whole
    assert torch.equal(logits(again, ids), logits(fresh, ids))
    other = load(tiny_dir)
    lora.inject(other, targets=("q_proj", "v_proj", "down_proj"), r=8, alpha=16, rslora=True)
    with pytest.raises(ValueError, match="r=4"):
        lora.load_adapter(other, tmp_path / "a")
    other = load(tiny_dir)
    lora.inject(other, targets=("q_proj", "v_proj"), r=4, alpha=16, rslora=True)
    with pytest.raises(ValueError, match="4 unexpected keys.*down_proj"):
        lora.load_adapter(other, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="1 missing keys"):
        lora.load_adapter(load(tiny_dir), tmp_path / "a")
    config["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported LoRA options.*use_dora"):
        lora.load_adapter(load(tiny_dir), tmp_path / "a")


@pytest.mark.parametrize("targets, rslora", [(lora.DEFAULT_TARGETS, False), ("all-linear", True)])
def test_peft_loads_ours(tiny_dir, tmp_path, targets, rslora):
    peft = pytest.importorskip("peft")
    model = load(tiny_dir)
    ids = ids_for(model)
    lora.inject(model, targets=targets, r=8, alpha=16, rslora=rslora)
    randomize_b(model)
    ours = logits(model, ids)
    lora.save_adapter(model, tmp_path, base_model_name_or_path=tiny_dir)
    theirs_model = peft.PeftModel.from_pretrained(load(tiny_dir), str(tmp_path)).eval()
    config = theirs_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (8, 16, rslora)
    theirs = logits(theirs_model, ids)
    diff = (ours - theirs).abs().max().item()
    print(f"ours -> peft ({targets}, rslora={rslora}): max |diff| = {diff:.3g}")
    assert (ours - logits(load(tiny_dir), ids)).abs().max() > 1e-3 and diff < 1e-5


def test_we_load_peft(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.1,
                             task_type="CAUSAL_LM")
    theirs_model = peft.get_peft_model(load(tiny_dir), config).eval()
    randomize_b(theirs_model)
    ids = ids_for(theirs_model)
    theirs = logits(theirs_model, ids)
    theirs_model.save_pretrained(str(tmp_path))
    model = load(tiny_dir)
    lora.load_adapter(model, tmp_path)
    assert len(lora.lora_layers(model)) == 6 and lora.lora_layers(model)["model.layers.0.mlp.gate_proj"].dropout == 0.1
    diff = (logits(model, ids) - theirs).abs().max().item()
    print(f"peft -> ours: max |diff| = {diff:.3g}")
    assert (theirs - logits(load(tiny_dir), ids)).abs().max() > 1e-3 and diff < 1e-5


def test_export_merged(tiny_dir, tmp_path):
    model = load(tiny_dir)
    ids = ids_for(model)
    lora.inject(model, targets="all-linear", r=4, alpha=8)
    randomize_b(model)
    adapted = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tools.export_merged(model, tmp_path / "m", tokenizer=AutoTokenizer.from_pretrained(tiny_dir))
    assert len(lora.lora_layers(model)) == 14
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), adapted)
    exported = load(tmp_path / "m")
    assert not lora.is_lora(exported) and exported.state_dict().keys() == load(tiny_dir).state_dict().keys()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    assert (logits(exported, ids) - adapted).abs().max() < 1e-5
    assert os.path.isfile(tmp_path / "m" / "tokenizer.json")


def test_bf16_base_fp32_adapters(tiny_dir):
    model = load(tiny_dir, dtype=torch.bfloat16)
    ids = ids_for(model)
    base = logits(model, ids)
    lora.inject(model, r=4, alpha=8)
    randomize_b(model)
    params = lora.lora_parameters(model)
    assert all(p.dtype == torch.float32 for _, p in params)
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in lora.lora_layers(model).values())
    out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - base).abs().max() > 1e-2
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for _, p in params)
    with lora.adapters_off(model):
        assert torch.equal(logits(model, ids), base)
    layer = lora.lora_layers(model)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():  # the fp32 update is added to the bf16 base output, then rounded once
        h = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), layer.lora_A), layer.lora_B)
        expected = (layer.base_layer(x).float() + h * layer.scaling).bfloat16()
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
