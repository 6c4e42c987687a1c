"""logs.py: loggers, the completions table, the run summary, plots."""
import glob
import json
import os
import sys
import types

import pytest

import logs

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- loggers

def test_check_loggers_names():
    assert logs.check_loggers([]) == []
    assert logs.check_loggers(["jsonl", "none"]) == []
    with pytest.raises(ValueError, match=r"unknown logger 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        logs.check_loggers(["jsonl", "tensorbord"])
    with pytest.raises(ValueError, match="unknown logger 'mlflow'; choose from jsonl, none, tensorboard, wandb"):
        logs.check_loggers("mlflow")


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_check_loggers_missing_package(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ValueError) as e:
        logs.check_loggers(["jsonl", name])
    assert str(e.value) == f"loggers: {name} needs the {name} package: pip install {name}"


def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert logs.check_loggers("jsonl, tensorboard") == ["tensorboard"]
    (tb,) = logs.open_loggers(["tensorboard"], str(tmp_path))
    tb.log({"step": 0, "eval/accuracy": 0.25}, step=0)
    tb.log({"step": 1, "reward": 0.5, "rewards/math_correctness": 1, "loss": None, "warning": "cut"}, step=1)
    tb.log({"step": 2, "reward": 0.75, "rewards/math_correctness": 0}, step=2)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"eval/accuracy", "reward", "rewards/math_correctness"}
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("rewards/math_correctness")] == [(1, 1.0), (2, 0.0)]


def test_wandb_logger_calls(monkeypatch, tmp_path):
    """A stand-in wandb module records what the logger asks of it."""
    calls = []
    run = types.SimpleNamespace(log=lambda m, step: calls.append(("log", m, step)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (wb,) = logs.open_loggers(["wandb"], str(tmp_path / "out"), run_name="r1", config={"seed": 3})
    wb.log({"step": 4, "reward": 1, "rewards/format": 0.5, "warning": "cut", "eval/reward": None}, step=4)
    wb.close()
    assert calls == [("init", dict(project="nmgrpo", entity=None, name="r1", dir=str(tmp_path / "out"),
                                   config={"seed": 3})),
                     ("log", {"reward": 1.0, "rewards/format": 0.5}, 4), ("finish",)]
    assert (tmp_path / "out").is_dir()
    calls.clear()
    logs.open_loggers(["wandb"], str(tmp_path), wandb_project="p", wandb_entity="e")
    assert calls[0][1]["project"] == "p" and calls[0][1]["entity"] == "e"


def test_wandb_logger_offline(monkeypatch, tmp_path):
    """The real package in offline mode writes its run under output_dir/wandb."""
    pytest.importorskip("wandb")
    for var, value in [("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONFIG_DIR", tmp_path / "cfg"),
                       ("WANDB_CACHE_DIR", tmp_path / "cache"), ("WANDB_DATA_DIR", tmp_path / "data")]:
        monkeypatch.setenv(var, str(value))
    (wb,) = logs.open_loggers(["wandb"], str(tmp_path / "out"), run_name="offline", config={"seed": 0})
    wb.log({"step": 1, "reward": 0.5}, step=1)
    wb.close()
    assert glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*" / "*.wandb"))


# ---------------------------------------------------------------------------- the terminal

ROWS = [dict(prompt="<|im_start|>user\nWhat is   3+4?\nPut the answer in a box.",
             completion="Let me think.\n\n3 + 4 = 7, so the answer is \\boxed{7}. " + "And more words. " * 20,
             reward=1.1, advantage=0.866, rewards={"math_correctness": 1.0, "format": 0.1}),
        dict(prompt="What is 2+2?", completion="5", reward=0.0, advantage=-123456.0,
             rewards={"math_correctness": 0.0, "format": float("nan")})] * 3


@pytest.mark.parametrize("width", [60, 100, 160])
def test_completions_table_fits(width):
    lines = logs.completions_table(ROWS, width=width, max_rows=4).splitlines()
    assert max(map(len, lines)) <= width
    assert len(lines) == 2 + 4 + 1 and lines[-1] == "… 2 more"
    header = lines[0].split()
    assert header[:2] == ["prompt", "completion"] and header[-2:] == ["total", "adv"]
    assert header[2].startswith("math_") and header[3] == "format"
    first = lines[2]
    assert first.startswith("<|im_st") and "…" in first  # the heads, cut to fit
    assert first.split()[-4:] == ["1.00", "0.10", "1.10", "0.87"]
    assert lines[3].split()[-4:] == ["0.00", "nan", "0.00", "-1e+05"]


def test_completions_table_wide_and_missing():
    table = logs.completions_table(ROWS[:1], width=400)
    assert len(table.splitlines()) == 3 and "math_corr…" in table
    assert " ".join(ROWS[0]["prompt"].split()) in table  # whitespace collapsed, not cut
    row = dict(prompt="p", completion="c", reward=0.5)  # no per-function rewards, no advantage
    lines = logs.completions_table([row], width=50).splitlines()
    assert lines[0].split() == ["prompt", "completion", "total", "adv"] and lines[2].split() == ["p", "c", "0.50", "-"]
    many = dict(prompt="p", completion="c", reward=1.0, advantage=0.0, rewards={f"reward_{i}": 0.5 for i in range(12)})
    assert max(map(len, logs.completions_table([many], width=80).splitlines())) <= 80
    assert logs.completions_table([]) == ""


def test_run_summary():
    text = logs.run_summary(120, 3723.4, 1234.5, best_eval={"step": 40, "eval/accuracy": 0.52, "eval/reward": 0.61},
                            last_eval={"step": 120, "eval/accuracy": 0.5, "eval/reward": 0.6},
                            checkpoint="out/checkpoint-120", output_dir="out")
    assert text.splitlines() == [
        "done: 120 steps in 1:02:03, 1,234 tokens/s",
        "best eval (step 40): accuracy=0.52 reward=0.61",
        "last eval (step 120): accuracy=0.5 reward=0.6",
        "checkpoint: out/checkpoint-120",
        f"logs: {os.path.join('out', 'metrics.jsonl')}, {os.path.join('out', 'samples.jsonl')}",
        "plots: python tools.py plot out"]
    short = logs.run_summary(3, 5.2, None, plots_dir="out/plots")
    assert short.splitlines() == ["done: 3 steps in 0:00:05", "plots: out/plots"]
    assert logs.run_summary(1, 90061, 10.0).startswith("done: 1 steps in 25:01:01, 10 tokens/s")


# ---------------------------------------------------------------------------- plots

def write_metrics(folder, rows, tail=""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(tail)


def train_rows(n=12):
    rows = [{"step": 0, "eval/reward": 0.1, "eval/accuracy": 0.0}]
    for s in range(1, n + 1):
        rows.append({"step": s, "reward": s / n, "reward_std": 0.1, "rewards/math_correctness": s / n,
                     "rewards/math_correctness_std": 0.2, "rewards/format": 0.5, "accuracy": s / n,
                     "completion_length": 20.0 + s, "completion_length_max": 32, "entropy": 1.0 / s,
                     "bregman": 0.01 * s, "grad_norm": None if s == 3 else 2.0, "lr": 1e-5, "loss": 0.1,
                     "warning": "over half the completions hit max_completion_length"})
    rows[-1].update({"eval/reward": 0.9, "eval/accuracy": 0.75})
    return rows


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    write_metrics(run, train_rows(), tail='{"step": 13, "rew')  # a last line cut short by a kill
    paths = logs.plot(str(run))
    names = ["reward", "accuracy", "completion_length", "entropy", "regulariser", "grad_norm", "lr", "eval"]
    assert paths == [str(run / "plots" / f"{n}.png") for n in names]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG


def test_plot_skips_missing_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "reward": 0.5, "kl": None if s == 2 else 0.1, "entropy": None, "lr": 1e-6} for s in (1, 2, 3)]
    write_metrics(tmp_path / "run", rows)
    paths = logs.plot(str(tmp_path / "run"), out_dir=str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == ["reward.png", "regulariser.png", "lr.png"]
    assert sorted(os.listdir(tmp_path / "figs")) == ["lr.png", "regulariser.png", "reward.png"]


def test_plot_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"metrics\.jsonl not found: run training first"):
        logs.plot(str(tmp_path / "nowhere"))
    write_metrics(tmp_path, [], tail="\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl has no metrics rows: run training first"):
        logs.plot(str(tmp_path))
    write_metrics(tmp_path, [{"step": 1, "reward": 0.5}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match="plot needs the matplotlib package: pip install matplotlib"):
        logs.plot(str(tmp_path))
