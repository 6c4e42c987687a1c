"""Failure: stop signals save and exit, kill -9 never costs the last good checkpoint, corruption is caught,
and a long run holds its memory and file handles."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
import config
import configurator
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = json.dumps([{"type": "length", "params": {"target_length": 3}}])


def argv(small, out, steps, save_steps=0):
    return [sys.executable, os.path.join(REPO, "train.py"), "--model_name", small["model_name"], "--dataset_name",
            small["dataset_name"], "--column_mapping", json.dumps(small["column_mapping"]), "--rewards", LENGTH,
            "--eval_size", "0", "--batch_size", "2", "--num_generations", "4", "--max_completion_length", "8",
            "--max_prompt_length", "64", "--device", "cpu", "--precision", "fp32", "--max_steps", str(steps),
            "--save_steps", str(save_steps), "--logging_steps", "1", "--output_dir", out]


def rows(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_exits_cleanly(small, tmp_path, sig):
    out = str(tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv(small, out, 100000), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(rows(out)) >= 3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    step = rows(out)[-1]["step"]
    assert os.path.isfile(os.path.join(out, f"checkpoint-{step}", "trainer_state.json"))
    assert checkpoint.checkpoint_problem(os.path.join(out, f"checkpoint-{step}")) is None
    assert f"{signal.Signals(sig).name}: stopped after step {step}" in stdout + stderr
    run = train.setup(configurator.load(argv(small, out, step + 1)[2:] + ["--resume", "latest"]))
    assert run.step == step
    assert train.fit(run)["steps"] == step + 1


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(small, tmp_path):
    out = str(tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv(small, out, 100000, save_steps=1), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saving = lambda: any(d.startswith(".tmp-") for d in os.listdir(out)) if os.path.isdir(out) else False  # noqa: E731
    wait_for(lambda: len(checkpoint.checkpoints(out)) >= 2)
    wait_for(saving)  # a save in flight
    proc.kill()
    proc.wait()
    done = checkpoint.checkpoints(out)
    assert done and all(checkpoint.checkpoint_problem(p) is None for p in done)
    run = train.setup(configurator.load(argv(small, out, 100000, save_steps=1)[2:] + ["--resume", "latest"]))
    assert run.step == int(done[-1].rsplit("-", 1)[1])
    train.train_step(run)


def test_a_corrupted_checkpoint_is_skipped_or_refused(small, tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = config.make(**{**small, "rewards": json.loads(LENGTH), "eval_size": 0, "max_steps": 2, "save_steps": 1,
                         "output_dir": out})
    train.train(cfg)
    newest = os.path.join(out, "checkpoint-2")
    with open(os.path.join(newest, "optimizer.safetensors"), "r+b") as f:
        f.truncate(100)  # a half-written file
    assert "optimizer.safetensors" in checkpoint.checkpoint_problem(newest)
    capsys.readouterr()
    run = train.setup(config.make(**{**cfg.__dict__, "max_steps": 3, "resume": "latest"}))
    assert run.resume.endswith("checkpoint-1") and run.step == 1
    assert "skipping corrupted checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="corrupted"):
        train.setup(config.make(**{**cfg.__dict__, "max_steps": 3, "resume": newest}))
    with open(os.path.join(out, "checkpoint-1", "rng.safetensors"), "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match="every checkpoint"):  # never a silent restart from step 0
        train.setup(config.make(**{**cfg.__dict__, "max_steps": 3, "resume": "latest"}))


def _rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_soak_200_steps_holds_memory_and_file_handles(small, tmp_path, monkeypatch):
    seen = {}
    real = train.train_step

    def step(run):
        out = real(run)
        if run.step in (50, 200):
            seen[run.step] = (_rss_mib(), len(os.listdir("/proc/self/fd")))
        return out

    monkeypatch.setattr(train, "train_step", step)
    cfg = config.make(**{**small, "rewards": json.loads(LENGTH), "eval_size": 8, "max_steps": 200, "eval_steps": 50,
                         "save_steps": 50, "logging_steps": 10, "memory_metrics": False,
                         "output_dir": str(tmp_path / "soak")})
    train.train(cfg)
    (rss50, fd50), (rss200, fd200) = seen[50], seen[200]
    assert rss200 <= rss50 * 1.05, (rss50, rss200)
    assert fd200 <= fd50, (fd50, fd200)
    assert [os.path.basename(p) for p in checkpoint.checkpoints(cfg.output_dir)] == ["checkpoint-150", "checkpoint-200"]
