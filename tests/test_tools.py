"""tools.py: the plots of a run and of saved mirror maps, the merged LoRA export, the knob table."""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import logs
import tools
import train
from mirror import NeuralMirror

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": r}) + "\n"
                                                            for s, r in ((1, 0.5), (2, 0.7))))
    assert tools.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "png")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "png" / "reward.png")]
    assert tools.main(["plot", str(tmp_path / "none")]) == 2
    assert "run training first" in capsys.readouterr().err


def test_mirror_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    a, b, out = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(tmp_path / "m.png")
    NeuralMirror().from_vector(NeuralMirror().to_vector() + 0.3).save(a)  # learned, and its initial map
    NeuralMirror(0.01, seed=7).save(b)
    assert tools.main(["mirror", a, b, "--out", out, "--coef", "1e-4", "--beta", "0.04"]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert tools.main(["mirror", str(tmp_path / "none.safetensors")]) == 2
    assert "is not a file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match="plot needs the matplotlib package: pip install matplotlib"):
        logs.plot_mirror([a], out)


def test_merge_command_exports_a_plain_model(small, tmp_path):
    from transformers import AutoModelForCausalLM
    run = train.setup(config.make(**{**small, "output_dir": str(tmp_path / "a"), "eval_size": 0}, use_lora=True,
                                  lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                  rewards=[{"type": "length", "params": {"target_length": 3}}]))
    ckpt = train.fit(run)["checkpoint"]
    out = str(tmp_path / "merged")
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools.py"), "merge", ckpt, out], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        assert (merged(ids).logits - run.model.eval()(ids).logits).abs().max().item() < 1e-5
    assert tools.main(["merge", str(tmp_path / "a"), str(tmp_path / "m2")]) == 2  # not an adapter folder


def test_the_knob_table_in_docs_is_generated_from_config():
    table = tools.knobs()
    assert table.count("\n| `") == len(config.FIELDS)
    with open(os.path.join(REPO, "docs", "configuration.md")) as f:
        assert table in f.read(), "docs/configuration.md is stale: paste the output of `python tools.py knobs`"
