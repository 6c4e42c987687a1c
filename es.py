"""Meta-learning the neural mirror map by evolution strategies (ES): each candidate is a short NMGRPO run.

    python es.py --config configs/study.py                        # candidates one after another
    torchrun --nproc_per_node 4 es.py --config FILE                # candidates spread over 4 processes
    python es.py --config FILE --resume                            # continue a stopped search exactly
    python train.py --config FILE --mirror_path OUT/best_mirror.safetensors   # train with the learned map

Gaussian ES over the 380 mirror parameters x = [v, w, b, a, c] (mirror.py). Iteration t draws
es_population/2 directions eps ~ N(0, I) from a generator seeded seed + t, and scores the antithetic
candidates x + sigma*eps, x - sigma*eps and the centre x itself (x starts as the map mirror_init_scale /
mirror_seed give, or the one in mirror_path); a score (the fitness) is the held-out
result of an inner run of es_inner_steps NMGRPO steps with that mirror (held_out_score). Then

    g = sum_i s_i * eps_i / (population * sigma)      s: the shaped fitnesses of the candidates
    x <- max(x + es_lr * sigma * g / rms(g), 0);   sigma <- sigma * es_sigma_decay      rms(g) = |g| / sqrt(380)

The step moves the parameters by es_lr * sigma (root mean square): shaped fitnesses fix |g| whatever the fitness
says, so only g's direction is information, and sigma, the scale the fitness was probed at, bounds the step.

Its guarantees (each one a fault of the ES loop our users come from):
- parameters stay >= 0: candidates and every updated centre are projected (clamped at 0, like
  NeuralMirror.project_), so each map that is trained with or saved has D >= 0; the estimate keeps the
  unprojected eps. Projection rather than softplus, so that es_sigma and es_lr act on the parameters.
- the centre is scored every iteration, beside its candidates; the best mirror is the best scored
  centre (best_mirror.safetensors), never a lucky candidate.
- antithetic pairs stay intact: every candidate counts every iteration (a failed one with the worst
  fitness), and nothing is carried over between iterations.
- centred-rank fitness shaping (es_rank_shaping, on by default): ranks mapped to [-0.5, 0.5], tied
  fitnesses sharing their mean rank so that equal scores push nowhere; off: fitnesses standardised.
- fitness is the held-out score (es_fitness: accuracy or mean reward) on es_eval_samples prompts carved
  off the training split, disjoint from the inner run's training prompts; eval_split is never used, so
  it stays a test set the search has not seen.
- common random numbers: the centre and the candidates of iteration t all train with seed + t (the same
  data order, sampling noise and validation prompts), so their differences are the mirror's; the seed
  moves with t, so that the map is not fitted to one draw.

Several processes (torchrun): run i of an iteration (0: the centre, then the candidates) trains on rank
i % world, and the scores are summed over the processes (gloo on CPU, nccl beside gloo on GPUs). Rank 0
writes, after every iteration, es_state.safetensors (centre and best as tensors, and in its metadata the
iteration, sigma, seed, population and history: one file, written to a temporary name and renamed),
best_mirror.safetensors and a row of es_metrics.jsonl. The perturbations are a function of seed + t, so
resuming needs no generator state: --resume (or --resume=latest) continues exactly. An inner run that
raises or scores NaN gets the worst fitness of its iteration and is logged; a ValueError (a config that
cannot run, the same for every candidate) stops the search.
"""
import dataclasses
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import common
import config as config_lib
import configurator
import load
import train
from common import log
from mirror import N_PARAMS, NeuralMirror, check_parameters

STATE, BEST, METRICS = "es_state.safetensors", "best_mirror.safetensors", "es_metrics.jsonl"


# ---------------------------------------------------------------------------- the ES core, on tensors

def perturbations(seed, t, population, dim=N_PARAMS):
    """Iteration t's directions (population, dim) from a generator seeded seed + t: rows 2k, 2k+1 are eps_k, -eps_k."""
    eps = torch.randn(population // 2, dim, generator=torch.Generator().manual_seed(seed + t))  # (P/2, dim)
    return torch.stack([eps, -eps], 1).reshape(population, dim)  # (P, dim)


def candidates(centre, eps, sigma):
    """The candidates max(centre + sigma*eps, 0) (P, dim)."""
    return (centre + sigma * eps).clamp(min=0)


def centred_ranks(f):
    """Ranks of f (P,) mapped linearly onto [-0.5, 0.5]; tied values share their mean rank (sum 0)."""
    ranks = torch.empty(len(f), dtype=torch.float64)
    ranks[f.argsort(stable=True)] = torch.arange(len(f), dtype=torch.float64)
    for v in f.unique():
        ranks[f == v] = ranks[f == v].mean()
    return ranks / (len(f) - 1) - 0.5


def shape(f, rank_shaping=True):
    """The weights (P,) of the gradient estimate: centred ranks, or f standardised (zeros when all equal)."""
    if rank_shaping:
        return centred_ranks(f)
    std = f.std()
    return (f - f.mean()) / std if std > 0 else torch.zeros_like(f)


def gradient(weights, eps, sigma):
    """The ES estimate of the fitness gradient (dim,): sum_i w_i * eps_i / (P * sigma)."""
    return weights.to(eps.dtype) @ eps / (len(eps) * sigma)


def update(centre, grad, lr, sigma):
    """A step of root mean square lr * sigma along the estimate (none when it is 0), projected onto x >= 0."""
    rms = grad.norm() / len(grad) ** 0.5
    return (centre + lr * sigma * grad / rms).clamp(min=0) if rms > 0 else centre.clone()


def worst_filled(f):
    """f (P,) with every failed (non-finite) entry replaced by the worst finite one."""
    ok = torch.isfinite(f)
    return torch.where(ok, f, f[ok].min() if ok.any() else 0.0)


# ---------------------------------------------------------------------------- state

def save_state(folder, state):
    """Write the state to folder/es_state.safetensors atomically: centre and best as tensors, the rest as JSON."""
    meta = {k: v for k, v in state.items() if k not in ("centre", "best")}
    common.atomic_write(os.path.join(folder, STATE), lambda tmp: save_file(
        {"centre": state["centre"].contiguous(), "best": state["best"].contiguous()}, tmp,
        metadata={"state": json.dumps(meta)}))


def load_state(path):
    """The state dict saved by save_state; ValueError unless its centre and best are mirror vectors (finite, >= 0)."""
    try:
        with safe_open(path, "pt") as f:
            meta = (f.metadata() or {}).get("state")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        meta, tensors = None, str(e)
    if meta is None:
        raise ValueError(f"{path} is not an {STATE} ({tensors if isinstance(tensors, str) else 'no ES state'}): "
                         "give the ES run's output_dir, or --resume=latest")
    for k in ("centre", "best"):
        if k not in tensors or tensors[k].shape != (N_PARAMS,):
            raise ValueError(f"{path} has no {k} of shape ({N_PARAMS},): it is damaged; resume from another state")
        check_parameters(tensors[k], f"{path}'s {k}")
    return {**json.loads(meta), **tensors}


def start(cfg):
    """A fresh state (the centre from mirror_path, or the map mirror_init_scale / mirror_seed give), or the
    saved one when cfg.resume is 'latest' (output_dir's) or a folder or file."""
    path = os.path.join(cfg.output_dir, STATE) if cfg.resume in (None, "latest") else \
        os.path.join(cfg.resume, STATE) if os.path.isdir(cfg.resume) else cfg.resume
    if os.path.isfile(path) and cfg.resume is None:
        raise ValueError(f"output_dir={cfg.output_dir!r} holds an earlier ES run: continue it with --resume, "
                         "or give a new output_dir")
    if cfg.resume not in (None, "latest") and not os.path.isfile(path):
        raise ValueError(f"resume={cfg.resume!r}: no {STATE} there; give an ES output_dir or --resume=latest")
    if cfg.resume and os.path.isfile(path):
        state = load_state(path)
        if (state["seed"], state["population"]) != (cfg.seed, cfg.es_population):
            raise ValueError(f"{path} was written with seed={state['seed']}, es_population={state['population']}: "
                             "resume with the same values")
        now = settings(cfg)
        changed = [f"{k}: {v!r} -> {now.get(k)!r}" for k, v in state.get("config", {}).items() if now.get(k) != v]
        if changed:
            log.warning("resuming with changed settings (the search will not match an uninterrupted one): " +
                        "; ".join(changed))
        log.info(f"resumed from {path} after iteration {state['iteration']}")
        return state
    if cfg.resume == "latest":
        log.info(f"resume='latest': no {STATE} in {cfg.output_dir} yet, starting at iteration 0")
    centre = load.mirror(cfg).to_vector()  # (380,), checked >= 0 by NeuralMirror.load
    return dict(centre=centre, best=centre.clone(), iteration=0, sigma=cfg.es_sigma, seed=cfg.seed,
                population=cfg.es_population, best_fitness=None, best_iteration=None, history=[],
                config=settings(cfg))


def settings(cfg):
    """The config a search was started with, as JSON values (where it writes and resumes from aside)."""
    return {k: v for k, v in config_lib.config_dict(cfg).items() if k not in ("resume", "output_dir")}


# ---------------------------------------------------------------------------- the loop

def score_all(xs, fitness, rank=0, world=1):
    """The fitness of every row of xs (n, dim), row i on rank i % world: (n,) float64, NaN where a run failed,
    and {i: reason} of the failures. A ValueError (a config that cannot run) is raised."""
    scores, failed = torch.zeros(len(xs), dtype=torch.float64), {}  # zeros elsewhere: the sum gathers
    for i in range(rank, len(xs), world):
        try:
            scores[i] = float(fitness(xs[i]))
            if not math.isfinite(scores[i]):
                raise FloatingPointError(f"fitness {scores[i].item()}")
        except ValueError:
            raise
        except Exception as e:  # the run is lost, the search goes on
            scores[i], failed[i] = math.nan, f"{type(e).__name__}: {e}"
    if world > 1:
        import torch.distributed as dist
        common.all_reduce(scores, world)
        parts = [None] * world
        dist.all_gather_object(parts, failed)
        failed = {i: why for part in parts for i, why in part.items()}
    return scores, failed


def iteration(cfg, state, t, fitness, rank=0, world=1):
    """Score iteration t's centre and candidates, update the state in place; returns its metrics row."""
    t0 = time.perf_counter()
    sigma = state["sigma"]
    eps = perturbations(cfg.seed, t, cfg.es_population)  # (P, dim)
    xs = torch.cat([state["centre"][None], candidates(state["centre"], eps, sigma)])  # (1 + P, dim): centre first
    scores, failed = score_all(xs, lambda x: fitness(x, t), rank, world)
    for i, why in sorted(failed.items()):
        log.warning(f"iteration {t + 1}: {'the centre' if i == 0 else f'candidate {i}'} failed ({why}); "
                    "it gets the worst fitness")
    if len(failed) == len(xs):
        raise ValueError(f"iteration {t + 1}: every inner run failed (first: {failed[min(failed)]}); "
                         "fix the inner runs' config")
    f = worst_filled(scores[1:])  # (P,)
    grad = gradient(shape(f, cfg.es_rank_shaping), eps, sigma)  # (dim,)
    ok = scores[1:][torch.isfinite(scores[1:])]
    centre_fitness = scores[0].item() if math.isfinite(scores[0]) else None
    if centre_fitness is not None and (state["best_fitness"] is None or centre_fitness > state["best_fitness"]):
        state.update(best=state["centre"].clone(), best_fitness=centre_fitness, best_iteration=t + 1)
    centre = update(state["centre"], grad, cfg.es_lr, sigma)
    row = dict(iteration=t + 1, fitness_mean=ok.mean().item() if len(ok) else None,
               fitness_std=ok.std().item() if len(ok) > 1 else 0.0, fitness_min=ok.min().item() if len(ok) else None,
               fitness_max=ok.max().item() if len(ok) else None, centre_fitness=centre_fitness,
               best_fitness=state["best_fitness"], sigma=sigma, grad_norm=grad.norm().item(),
               centre_norm=state["centre"].norm().item(),  # of the centre scored, before the update
               step_norm=(centre - state["centre"]).norm().item(),  # of the update, after the projection
               fitness=[None if math.isnan(s) else s for s in scores[1:].tolist()],
               failed={str(i): why for i, why in sorted(failed.items())}, time=time.perf_counter() - t0)
    state.update(centre=centre, sigma=sigma * cfg.es_sigma_decay, iteration=t + 1)
    state["history"].append(row)
    return row


def evolve(cfg, fitness, rank=0, world=1):
    """Run (or resume) the search to es_iterations; fitness(x, t) scores a (380,) mirror vector with iteration
    t's seed. Rank 0 saves the state, the best mirror and the metrics after every iteration. Returns the state."""
    common.configure_logging(cfg.log_level, rank)
    os.makedirs(cfg.output_dir, exist_ok=True)
    state = start(cfg)
    metrics = os.path.join(cfg.output_dir, METRICS)
    if rank == 0:  # rows past the saved state are written again; runs a kill left behind are removed
        common.truncate_jsonl(metrics, "iteration", state["iteration"])
        for stale in glob.glob(os.path.join(cfg.output_dir, ".candidate-*")):
            shutil.rmtree(stale, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    bar = tqdm(total=cfg.es_iterations, initial=state["iteration"], desc="es", disable=common.quiet(),
               dynamic_ncols=True)
    for t in range(state["iteration"], cfg.es_iterations):
        row = iteration(cfg, state, t, fitness, rank, world)
        if rank == 0:  # the state last: it is what resume trusts, and rows past it are dropped
            common.append_jsonl(metrics, [row])
            NeuralMirror(cfg.mirror_init_scale, cfg.mirror_seed).from_vector(state["best"]).save(
                os.path.join(cfg.output_dir, BEST))
            save_state(cfg.output_dir, state)
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                          if k not in ("fitness", "failed")))
        bar.set_postfix(centre=row["centre_fitness"], best=state["best_fitness"])
        bar.update(1)
    bar.close()
    return state


# ---------------------------------------------------------------------------- the inner runs

def inner_config(cfg, t, output_dir):
    """The Config of an inner run of iteration t: es_inner_steps steps with seed + t (common to the iteration),
    scored once at the end on es_eval_samples prompts carved off the training split, quietly, into output_dir."""
    return dataclasses.replace(
        cfg, seed=cfg.seed + t, max_steps=cfg.es_inner_steps, eval_split="carve", eval_size=cfg.es_eval_samples,
        eval_steps=0, eval_on_start=False, save_steps=0, loggers=[], log_completions=False, resume=None,
        mirror_path=None, output_dir=output_dir, log_level="ERROR" if cfg.log_level == "ERROR" else "WARNING")


def held_out_score(cfg, mirror=None, fitness="accuracy"):
    """Train from cfg (with `mirror`) in this process alone, then the final held-out eval/accuracy or
    eval/reward: the fitness of a candidate. Raises FloatingPointError when it is not finite,
    KeyboardInterrupt when a stop signal ended the run, ValueError for a config that cannot run."""
    with common.kept_log_level():  # the inner run is quieter than the search
        out = train.fit(train.setup(cfg, mirror, solo=True), save_last=False)
    if out["stopped_by"]:
        raise KeyboardInterrupt(f"{out['stopped_by']}: the inner run stopped after step {out['steps']}")
    score = out["metrics"].get(f"eval/{fitness}")
    if score is None:
        raise ValueError(f"es_fitness={fitness!r}: the run logged no eval/{fitness} (accuracy needs the "
                         "math_correctness reward and eval_size > 0)")
    if not math.isfinite(score):
        raise FloatingPointError(f"eval/{fitness} = {score}")
    return score


def inner_fitness(cfg):
    """fitness(x, t): the held-out score of an inner run of iteration t with the mirror x, in a temporary folder
    under output_dir that is removed afterwards."""
    def fitness(x, t):
        mirror = NeuralMirror(cfg.mirror_init_scale, cfg.mirror_seed).from_vector(x)
        with tempfile.TemporaryDirectory(prefix=".candidate-", dir=cfg.output_dir, ignore_cleanup_errors=True) as d:
            return held_out_score(inner_config(cfg, t, d), mirror, cfg.es_fitness)
    return fitness


def check(cfg):
    """ValueError for a config the search cannot run."""
    if cfg.backend == "trl":
        raise ValueError("backend='trl': es.py trains its candidates on the native engine; set backend='auto'")
    names = [r.name for r in load.reward_fns(cfg)]
    if cfg.es_fitness == "accuracy" and "math_correctness" not in names:
        raise ValueError("es_fitness='accuracy' is the math_correctness reward's held-out mean: add that reward, "
                         "or set es_fitness='reward'")
    if cfg.divergence_type != "neural_mirror":
        raise ValueError(f"divergence_type={cfg.divergence_type!r}: es.py learns the neural mirror map; "
                         "set divergence_type='neural_mirror'")
    config_lib.validate(inner_config(cfg, 0, cfg.output_dir))


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\nThe search's knobs (every train.py knob applies to the inner runs):" +
              "".join(f"\n  --{k}={f.default!r}\n      {f.metadata['doc']}" for k, f in config_lib.FIELDS.items()
                      if f.metadata["group"] == "es" or k in ("seed", "output_dir", "resume", "mirror_path")))
        return 0
    argv = [a + "=latest" if a == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else a
            for i, a in enumerate(argv)]  # a bare --resume
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the inner runs' loading bars
    cfg, world = None, 1
    try:
        cfg = configurator.load(argv)
        check(cfg)
        rank, world = common.init_distributed(cfg.device, timeout_hours=24)  # ranks wait for the slowest share
        t0 = time.perf_counter()
        state = evolve(cfg, inner_fitness(cfg), rank, world)
    except ValueError as e:
        if cfg is not None and cfg.log_level == "DEBUG":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a stop signal: the last finished iteration is saved
        log.warning(f"stopped ({e or 'interrupted'}); continue with --resume")
        return 130
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    log.info(f"ES: {state['iteration']} iterations in {time.perf_counter() - t0:.0f} s; best centre fitness "
        f"{state['best_fitness']} (iteration {state['best_iteration']}): "
        f"{os.path.join(cfg.output_dir, BEST)}; train with --mirror_path={os.path.join(cfg.output_dir, BEST)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
