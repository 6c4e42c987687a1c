"""The study: on the offline toy task, does the regulariser matter, and what does an ES-learned mirror buy?

    python study.py                     # 11 to 14 minutes on 2 CPU cores; prints two markdown tables
    python study.py --seeds 0,1,2 --regime-seeds 0,1

0. The regime: none and kl at a few learning rates (REGIME_RATES), to show where the regulariser matters;
   configs/study.py trains at the rate where an unregularised run collapses and kl holds.
1. es.py on configs/study.py learns a mirror, scoring its candidates on prompts carved off the training split.
2. Five arms train max_steps from the same cold start, one run per seed: divergence none, kl, prob_l2, the
   random initial neural mirror, and the ES-learned mirror (its best scored centre). Each is scored by greedy
   accuracy on the test split (eval_split: the demo's 200 held-out prompts), which neither the cold start
   nor ES saw; the arms' seeds differ from every seed ES trained with. Each arm is compared with kl seed by
   seed: the mean paired difference and its 95% t-interval.
Runs go to output/study/; the tables (regime.md, results.md, results.json), the learned mirror and its plots to
docs/study/.
"""
import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time

import torch

import common
import config
import configurator
import es
import logs
import train
from common import log

REGIME_RATES = (1e-4, 3e-4, 6e-4, 1e-3)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "study.py")
RUNS, DOCS = os.path.join(HERE, "output", "study"), os.path.join(HERE, "docs", "study")


def arms(learned):
    """(name, config overrides) of the five arms."""
    return [("none", dict(divergence_type="none")), ("kl", dict(divergence_type="kl")),
            ("prob_l2", dict(divergence_type="prob_l2")), ("random mirror", dict(divergence_type="neural_mirror")),
            ("ES mirror", dict(divergence_type="neural_mirror", mirror_path=learned))]


def run(base, overrides, seed, folder):
    """Train one arm with one seed from scratch: (test accuracy, weighted penalty per token at the last step, s)."""
    shutil.rmtree(folder, ignore_errors=True)
    cfg = dataclasses.replace(base, seed=seed, output_dir=folder, log_level="WARNING", **overrides)
    config.validate(cfg)
    t0 = time.perf_counter()
    with common.kept_log_level():  # the run is quiet (WARNING); the study's own lines stay at INFO
        m = train.train(cfg)["metrics"]
    key = logs.DIVERGENCE_METRIC[cfg.divergence_type]
    weight = cfg.beta if cfg.divergence_type == "kl" else cfg.mirror_coefficient
    return m["eval/accuracy"], m[key] * weight, time.perf_counter() - t0


def mean_std(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def paired(xs, ys):
    """'mean [low, high]' of xs - ys seed by seed, with the 95% t-interval of the mean (n - 1 degrees of freedom)."""
    d = [x - y for x, y in zip(xs, ys)]
    if len(d) < 2:
        return f"{d[0]:+.3f}" if d else "-"
    half = (T975[len(d) - 2] if len(d) - 2 < len(T975) else 1.96) * statistics.stdev(d) / len(d) ** 0.5
    m = statistics.mean(d)
    return f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"


def table(results, es_seconds):
    """The markdown table of the arms, each against kl seed by seed."""
    lines = ["| arm | seeds | test accuracy (mean ± std) | minus kl, paired (mean [95% CI]) | per seed | penalty per "
             "token (weighted, last step) | wall time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        acc = r["accuracy"]
        extra = f" + ES {es_seconds:.0f} s" if name == "ES mirror" else ""
        against = "-" if name == "kl" or "kl" not in results else paired(acc, results["kl"]["accuracy"])
        lines.append(f"| {name} | {len(acc)} | {mean_std(acc)} | {against} | {', '.join(f'{a:.3f}' for a in acc)} | "
                     f"{statistics.mean(r['penalty']):.2e} | {sum(r['seconds']):.0f} s{extra} |")
    return "\n".join(lines)


def regime(base, seeds):
    """The markdown table of none and kl at each of REGIME_RATES: where does the regulariser matter?"""
    lines = [f"| learning rate | none (mean ± std) | kl, beta {base.beta:g} (mean ± std) | kl minus none, paired "
             "(mean [95% CI]) | wall time |", "| --- | --- | --- | --- | --- |"]
    for lr in REGIME_RATES:
        acc, seconds = {}, 0.0
        for arm in ("none", "kl"):
            acc[arm] = []
            for seed in seeds:
                a, _, s = run(dataclasses.replace(base, learning_rate=lr), dict(divergence_type=arm), seed,
                              os.path.join(RUNS, f"regime-{lr:g}-{arm}-{seed}"))
                acc[arm].append(a)
                seconds += s
        log.info(f"learning rate {lr:g}: none {mean_std(acc['none'])}, kl {mean_std(acc['kl'])}")
        lines.append(f"| {lr:g}{' (the study)' if lr == base.learning_rate else ''} | {mean_std(acc['none'])} | "
                     f"{mean_std(acc['kl'])} | {paired(acc['kl'], acc['none'])} | {seconds:.0f} s |")
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="comma-separated seeds of the arms (default 0 to 7)")
    parser.add_argument("--regime-seeds", default="0,1,2,3", help="seeds of the regime table (default 0 to 3)")
    args = parser.parse_args(argv)
    try:
        seeds, regime_seeds = ([int(s) for s in text.split(",")] for text in (args.seeds, args.regime_seeds))
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} / --regime-seeds {args.regime_seeds!r}: give comma-separated integers, "
                     "e.g. 0,1,2")
    common.configure_logging("INFO")
    torch.set_num_threads(1)  # tiny matmuls run fastest on one thread
    t0 = time.perf_counter()
    base = configurator.load(["--config", CONFIG])
    os.makedirs(DOCS, exist_ok=True)
    regime_text = regime(base, regime_seeds)
    log.info(regime_text)
    with open(os.path.join(DOCS, "regime.md"), "w") as f:
        f.write(regime_text + f"\n\n{len(regime_seeds)} seeds per cell, {base.max_steps} steps from the demo's cold "
                "start, greedy accuracy on the 200 held-out prompts.\n")
    es_dir = os.path.join(RUNS, "es")
    resume = ["--resume"] if os.path.isfile(os.path.join(es_dir, es.STATE)) else []
    if es.main(["--config", CONFIG, f"--output_dir={es_dir}"] + resume):
        return 2
    state = es.load_state(os.path.join(es_dir, es.STATE))
    es_seconds = sum(row["time"] for row in state["history"])  # every iteration's, resumed or not
    learned = os.path.join(DOCS, "best_mirror.safetensors")
    shutil.copyfile(os.path.join(es_dir, es.BEST), learned)
    results = {}
    for name, overrides in arms(learned):
        r = results[name] = {"accuracy": [], "penalty": [], "seconds": []}
        for seed in seeds:
            acc, penalty, seconds = run(base, overrides, seed, os.path.join(RUNS, f"{name.replace(' ', '_')}-{seed}"))
            for k, v in zip(r, (acc, penalty, seconds)):
                r[k].append(v)
            log.info(f"{name} seed {seed}: test accuracy {acc:.3f} ({seconds:.0f} s)")
    text = (table(results, es_seconds) + f"\n\nES: {state['iteration']} iterations x {base.es_population} "
            f"candidates + the centre, {base.es_inner_steps} steps each, {es_seconds:.0f} s; best validation score "
            f"{state['best_fitness']:.3f} (the centre of iteration {state['best_iteration']}). "
            f"Total {time.perf_counter() - t0:.0f} s.")
    log.info(text)
    with open(os.path.join(DOCS, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(DOCS, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "es_seconds": es_seconds, "arms": results, "es_history": state["history"]}, f,
                  indent=1)
    try:
        logs.plot_mirror([learned], os.path.join(DOCS, "mirror.png"))
        logs.plot_mirror([learned], os.path.join(DOCS, "mirror_weighted.png"), base.mirror_coefficient, base.beta)
    except ValueError as e:
        log.warning(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
