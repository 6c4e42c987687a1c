"""es.py: the ES core on synthetic fitness (no model), state and resume, failed runs, torchrun, real inner runs."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import config
import es
from mirror import N_PARAMS, NeuralMirror

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = torch.rand(N_PARAMS, generator=torch.Generator().manual_seed(1))  # the optimum of the synthetic fitness


def concave(x, t=0):
    """A known concave fitness of the 380-vector, maximal at TARGET (>= 0)."""
    return -((x - TARGET) ** 2).sum().item()


def es_cfg(tmp_path, **kw):
    return config.make({"output_dir": str(tmp_path / "es"), "log_level": "WARNING", **kw})


def rows(cfg):
    with open(os.path.join(cfg.output_dir, es.METRICS)) as f:
        return [json.loads(line) for line in f]


def test_perturbations_antithetic_and_seeded():
    eps = es.perturbations(42, 3, 10)
    assert eps.shape == (10, N_PARAMS)
    assert torch.equal(eps[0::2], -eps[1::2])  # pairs
    assert torch.equal(eps, es.perturbations(42, 3, 10))  # a function of seed + t
    assert torch.equal(eps, es.perturbations(41, 4, 10))
    assert not torch.equal(eps, es.perturbations(42, 4, 10))


def test_centred_ranks_and_ties():
    r = es.centred_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    assert r.tolist() == [0.5, -0.5, 0.0, 0.0]  # tied scores share their mean rank
    assert es.centred_ranks(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]  # equal scores push nowhere
    f = torch.randn(10, dtype=torch.float64)
    r = es.centred_ranks(f)
    assert r.sum().abs() < 1e-12 and r.min() == -0.5 and r.max() == 0.5
    assert torch.equal(r.argsort(), f.argsort())  # monotone
    assert torch.equal(es.shape(f * 1000 + 7), r)  # invariant to the fitness scale
    s = es.shape(f, rank_shaping=False)
    assert abs(s.mean().item()) < 1e-12 and abs(s.std().item() - 1) < 1e-12
    assert es.shape(torch.ones(4, dtype=torch.float64), rank_shaping=False).tolist() == [0.0] * 4


@pytest.mark.parametrize("rank_shaping", [True, False])
def test_gradient_estimate_points_along_the_true_gradient(rank_shaping):
    c = torch.rand(N_PARAMS, generator=torch.Generator().manual_seed(2))  # a linear fitness c.x
    centre = torch.ones(N_PARAMS)  # far from 0: no candidate is projected
    eps = es.perturbations(0, 0, 4000)
    f = (es.candidates(centre, eps, 0.01).double() @ c.double())
    g = es.gradient(es.shape(f, rank_shaping), eps, 0.01)
    assert torch.cosine_similarity(g, c, dim=0) > 0.9


@pytest.mark.parametrize("rank_shaping, kw, closer", [(True, {}, 1.0), (False, {}, 1.0),
                                                     (True, {"es_sigma": 0.1, "es_lr": 1.0}, 0.8)])
def test_es_climbs_a_concave_fitness(tmp_path, rank_shaping, kw, closer):
    """The defaults (population 10, sigma 0.01 decaying, 15 iterations) move the centre toward the optimum; a wider
    search (sigma 0.1, steps of sigma) moves it 20% of the way in 15 steps."""
    cfg = es_cfg(tmp_path, es_rank_shaping=rank_shaping, **kw)
    start = NeuralMirror(cfg.mirror_init_scale, cfg.mirror_seed).to_vector()
    state = es.evolve(cfg, concave)
    assert state["iteration"] == 15
    assert (state["centre"] - TARGET).norm() < closer * (start - TARGET).norm()
    history = rows(cfg)
    assert [r["iteration"] for r in history] == list(range(1, 16))
    assert history[-1]["centre_fitness"] > history[0]["centre_fitness"]
    assert history[0]["sigma"] == cfg.es_sigma and history[1]["sigma"] == pytest.approx(cfg.es_sigma * 0.99)
    for r in history:
        assert {"fitness_mean", "fitness_std", "fitness_min", "fitness_max", "centre_fitness", "sigma", "grad_norm",
                "centre_norm", "step_norm", "time"} <= r.keys()
        assert 0 < r["step_norm"] <= cfg.es_lr * r["sigma"] * N_PARAMS ** 0.5 * (1 + 1e-5)  # projected: shorter
    best = max(history, key=lambda r: r["centre_fitness"])  # the best scored centre, saved
    assert state["best_fitness"] == best["centre_fitness"] and state["best_iteration"] == best["iteration"]
    saved = NeuralMirror.load(os.path.join(cfg.output_dir, es.BEST)).to_vector()
    assert concave(saved) == best["centre_fitness"]


def test_step_size_is_set_by_lr_and_sigma():
    """Whatever the estimate's size, a step has root mean square lr * sigma; a zero estimate does not move."""
    centre = torch.ones(N_PARAMS)  # far from 0: no projection
    for scale in (1e-6, 1.0, 1e6):
        g = scale * torch.randn(N_PARAMS, generator=torch.Generator().manual_seed(3))
        assert (es.update(centre, g, 0.5, 0.1) - centre).pow(2).mean().sqrt().item() == pytest.approx(0.05)
    assert torch.equal(es.update(centre, torch.zeros(N_PARAMS), 0.5, 0.1), centre)


def test_noise_fitness_keeps_the_map_small(tmp_path):
    """Under fitness independent of the map, the default steps keep its norm within 2x of NeuralMirror(0.01, 42)'s
    over 15 iterations (the rule x + es_lr * g took it from 0.11 to about 7.5)."""
    noise = torch.Generator().manual_seed(0)
    cfg = es_cfg(tmp_path, es_iterations=15)
    assert (cfg.mirror_init_scale, cfg.mirror_seed) == (0.01, 42)
    es.evolve(cfg, lambda x, t: torch.rand(1, generator=noise).item())
    last = es.load_state(os.path.join(cfg.output_dir, es.STATE))["centre"].norm().item()
    norms = [r["centre_norm"] for r in rows(cfg)] + [last]
    assert max(norms) < 2 * norms[0]


def test_parameters_stay_non_negative(tmp_path):
    """With the optimum partly below 0, candidates and centres stay >= 0 (projection) and reach 0 there."""
    target = TARGET - 0.5
    seen = []

    def fitness(x, t):
        seen.append(x.min().item())
        return -((x - target) ** 2).sum().item()

    state = es.evolve(es_cfg(tmp_path, es_iterations=8, es_lr=1.0), fitness)
    assert min(seen) >= 0 and state["centre"].min() >= 0 and state["best"].min() >= 0
    at_zero = state["centre"] == 0  # the projection is active, and mostly where the optimum is below 0
    assert at_zero[target < -0.2].float().mean() > at_zero[target > 0.2].float().mean() + 0.1
    assert all(x >= 0 for x in es.update(torch.zeros(5), -torch.ones(5), 1.0, 1.0))


def test_resume_equals_straight(tmp_path):
    """2 iterations straight == 1 iteration, then --resume and 1 more: the same centre, best and rows."""
    straight = es.evolve(es_cfg(tmp_path / "a", es_iterations=2), concave)
    es.evolve(es_cfg(tmp_path / "b", es_iterations=1), concave)
    with pytest.raises(ValueError, match="earlier ES run"):
        es.evolve(es_cfg(tmp_path / "b", es_iterations=2), concave)
    with open(os.path.join(tmp_path / "b" / "es", es.METRICS), "a") as f:
        f.write('{"iteration": 2, "cut sh')  # a row a kill left half written
    resumed = es.evolve(es_cfg(tmp_path / "b", es_iterations=2, resume="latest"), concave)
    assert torch.equal(straight["centre"], resumed["centre"]) and torch.equal(straight["best"], resumed["best"])
    assert straight["sigma"] == resumed["sigma"] and resumed["iteration"] == 2
    drop = lambda rs: [{k: v for k, v in r.items() if k != "time"} for r in rs]  # noqa: E731
    a, b = rows(es_cfg(tmp_path / "a")), rows(es_cfg(tmp_path / "b"))
    assert drop(a) == drop(b) == drop(resumed["history"])
    saved = es.load_state(os.path.join(tmp_path / "b" / "es", es.STATE))
    assert torch.equal(saved["centre"], straight["centre"]) and saved["iteration"] == 2
    with pytest.raises(ValueError, match="same values"):
        es.evolve(es_cfg(tmp_path / "b", es_iterations=3, resume="latest", es_population=4), concave)


@pytest.mark.parametrize("key, bad", [("centre", -0.1), ("best", math.nan)])
def test_a_signed_or_corrupted_state_is_refused(tmp_path, key, bad):
    es.evolve(es_cfg(tmp_path, es_iterations=1), concave)
    path = os.path.join(tmp_path / "es", es.STATE)
    state = es.load_state(path)
    state[key][7] = bad
    es.save_state(str(tmp_path / "es"), state)
    with pytest.raises(ValueError, match=f"es_state.safetensors's {key}: mirror parameters must be finite and >= 0"):
        es.evolve(es_cfg(tmp_path, es_iterations=2, resume="latest"), concave)


def test_failed_candidates_get_the_worst_fitness(tmp_path, capsys):
    calls = []

    def fitness(x, t):  # per iteration: run 0 is the centre, then 4 candidates
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return math.nan if len(calls) == 5 else concave(x)

    state = es.evolve(es_cfg(tmp_path, es_population=4, es_iterations=3), fitness)
    assert state["iteration"] == 3 and len(calls) == 15  # the loop went on
    first = rows(es_cfg(tmp_path))[0]
    assert first["failed"].keys() == {"2", "4"} and "RuntimeError: out of memory" in first["failed"]["2"]
    assert first["fitness"][1] is None and first["fitness"][3] is None
    ok = [f for f in first["fitness"] if f is not None]
    assert first["fitness_min"] == min(ok) and first["fitness_mean"] == pytest.approx(sum(ok) / len(ok))
    assert "candidate 2 failed (RuntimeError: out of memory)" in capsys.readouterr().err
    f = es.worst_filled(torch.tensor([1.0, math.nan, 3.0, -math.inf], dtype=torch.float64))
    assert f.tolist() == [1.0, 1.0, 3.0, 1.0]


def test_every_run_failing_or_a_config_error_stops(tmp_path):
    def broken(x, t):
        raise FloatingPointError("eval/accuracy = nan")

    with pytest.raises(ValueError, match="every inner run failed"):
        es.evolve(es_cfg(tmp_path / "a", es_population=2), broken)

    def bad_config(x, t):
        raise ValueError("es_fitness='accuracy': the run logged no eval/accuracy")

    with pytest.raises(ValueError, match="logged no eval/accuracy"):
        es.evolve(es_cfg(tmp_path / "b", es_population=2), bad_config)


def test_cli_checks(tmp_path, capsys):
    assert es.main(["--divergence_type=kl", f"--output_dir={tmp_path}"]) == 2
    assert "es.py learns the neural mirror" in capsys.readouterr().err
    assert es.main(["--es_population=3", f"--output_dir={tmp_path}"]) == 2
    assert "must be even" in capsys.readouterr().err
    assert es.main(["--reward_functions=length", f"--output_dir={tmp_path}"]) == 2  # before any inner run
    assert "es_fitness='accuracy' is the math_correctness reward's" in capsys.readouterr().err
    NeuralMirror().save(str(tmp_path / "m.safetensors"))  # a mirror, not an ES state
    assert es.main([f"--output_dir={tmp_path}", f"--resume={tmp_path / 'm.safetensors'}"]) == 2
    assert "is not an es_state.safetensors" in capsys.readouterr().err


SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
import common, config, es
from mirror import NeuralMirror
cfg = config.make(output_dir={out!r}, es_population=6, es_iterations=2, log_level="WARNING", device="cpu")
rank, world = common.init_distributed(cfg.device)
target = torch.linspace(0, 1, 380)
bad = es.candidates(NeuralMirror().to_vector(), es.perturbations(cfg.seed, 0, 6), cfg.es_sigma)[2]  # run 3


def fitness(x, t):
    if t == 0 and torch.equal(x, bad):
        raise RuntimeError("boom")
    return -((x - target) ** 2).sum().item()


es.evolve(cfg, fitness, rank, world)
print(json.dumps({{"rank": rank, "world": world}}))
"""


def torchrun(args, nproc=2):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def saved(folder):
    with open(os.path.join(folder, es.METRICS)) as f:
        return es.load_state(os.path.join(folder, es.STATE)), [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path):
    """torchrun, gloo: 2 processes share the runs and gather the scores (a failure on rank 1 too) as 1 process does."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    exec(SCRIPT.format(repo=REPO, out=one), {})
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repo=REPO, out=two))
    done = torchrun([str(script)])
    assert sorted(json.loads(line)["rank"] for line in done.stdout.splitlines() if line.startswith("{")) == [0, 1]
    (s1, r1), (s2, r2) = saved(one), saved(two)
    assert torch.equal(s1["centre"], s2["centre"]) and torch.equal(s1["best"], s2["best"])
    assert [r["fitness"] for r in r1] == [r["fitness"] for r in r2]
    assert r1[0]["failed"].keys() == r2[0]["failed"].keys() == {"3"}  # run 3 ran on rank 1


def test_cli_two_processes_real_runs(small, tmp_path):
    """`torchrun --nproc_per_node 2 es.py` on the tiny model gives the candidates' scores and centre of 1 process."""
    args = [f"--{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in small.items()
            if k != "output_dir"] + [
        "--es_population=4", "--es_iterations=2", "--es_inner_steps=2", "--es_eval_samples=8", "--es_fitness=reward",
        # with these (grpo's per-sequence mean among them) the mirror moves the score
        "--loss_type=grpo", "--mirror_init_scale=1", "--mirror_coefficient=1000", "--es_sigma=0.5",
        "--learning_rate=0.05",
        '--rewards=[{"type": "length", "params": {"target_length": 3}}]', "--log_level=WARNING"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert es.main(args + [f"--output_dir={one}"]) == 0
    torchrun([os.path.join(REPO, "es.py")] + args + [f"--output_dir={two}"])
    (s1, r1), (s2, r2) = saved(one), saved(two)
    assert len(set(r1[0]["fitness"])) > 1  # the mirror changes the score: the gather is put to the test
    assert [r["fitness"] for r in r1] == [r["fitness"] for r in r2]
    assert [r["centre_fitness"] for r in r1] == [r["centre_fitness"] for r in r2]
    assert torch.equal(s1["centre"], s2["centre"])


def test_real_inner_runs(small, tmp_path):
    """Two candidates of 2 NMGRPO steps on the tiny model: scored, folders removed, the best mirror trains."""
    cfg = config.make({**small, "output_dir": str(tmp_path / "es"), "es_population": 2, "es_iterations": 1,
                       "es_inner_steps": 2, "es_eval_samples": 8, "es_fitness": "reward", "log_level": "WARNING",
                       "rewards": [{"type": "length", "params": {"target_length": 3}}]})
    state = es.evolve(cfg, es.inner_fitness(cfg))
    row = rows(cfg)[0]
    assert row["centre_fitness"] is not None and all(f is not None for f in row["fitness"]) and not row["failed"]
    assert sorted(os.listdir(cfg.output_dir)) == sorted([es.BEST, es.STATE, es.METRICS])  # run folders removed
    best = os.path.join(cfg.output_dir, es.BEST)
    assert torch.equal(NeuralMirror.load(best).to_vector(), state["best"])
    import train
    out = train.train(config.make({**small, "output_dir": str(tmp_path / "use"), "mirror_path": best}))
    assert out["steps"] == 2
