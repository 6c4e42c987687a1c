"""The study: on the offline toy task, does the regulariser matter, and what does an ES-learned mirror buy?

    python study.py                     # 10 to 12 minutes on 2 CPU cores; prints a markdown table
    python study.py --seeds 0,1,2

1. es.py on configs/study.py learns a mirror, scoring its candidates on prompts carved off the training split.
2. Five arms train max_steps from the same cold start, one run per seed: divergence none, kl, prob_l2, the
   random initial neural mirror, and the ES-learned mirror (its best scored centre). Each is scored by greedy
   accuracy on the test split (eval_split: the demo's 200 held-out prompts), which neither the cold start
   nor ES saw; the arms' seeds differ from every seed ES trained with.
Runs go to output/study/; the table (results.md, results.json), the learned mirror and its plots to docs/study/.
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

import config
import configurator
import es
import logs
import train

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
    m = train.train(cfg)["metrics"]
    key = logs.DIVERGENCE_METRIC[cfg.divergence_type]
    weight = cfg.beta if cfg.divergence_type == "kl" else cfg.mirror_coefficient
    return m["eval/accuracy"], m[key] * weight, time.perf_counter() - t0


def table(results, es_seconds):
    """The markdown table of the arms."""
    lines = ["| arm | seeds | test accuracy (mean ± std) | per seed | penalty per token (weighted, last step) "
             "| wall time |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        acc = r["accuracy"]
        extra = f" + ES {es_seconds:.0f} s" if name == "ES mirror" else ""
        lines.append(f"| {name} | {len(acc)} | {statistics.mean(acc):.3f} ± {statistics.stdev(acc) if len(acc) > 1 else 0.0:.3f} | "
                     f"{', '.join(f'{a:.3f}' for a in acc)} | {statistics.mean(r['penalty']):.2e} | "
                     f"{sum(r['seconds']):.0f} s{extra} |")
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of the arms (default 0,1,2,3,4)")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    torch.set_num_threads(1)  # tiny matmuls run fastest on one thread
    t0 = time.perf_counter()
    es_dir = os.path.join(RUNS, "es")
    resume = ["--resume"] if os.path.isfile(os.path.join(es_dir, es.STATE)) else []
    if es.main(["--config", CONFIG, f"--output_dir={es_dir}"] + resume):
        return 2
    state = es.load_state(os.path.join(es_dir, es.STATE))
    es_seconds = sum(row["time"] for row in state["history"])  # every iteration's, resumed or not
    os.makedirs(DOCS, exist_ok=True)
    learned = os.path.join(DOCS, "best_mirror.safetensors")
    shutil.copyfile(os.path.join(es_dir, es.BEST), learned)
    base = configurator.load(["--config", CONFIG])
    results = {}
    for name, overrides in arms(learned):
        r = results[name] = {"accuracy": [], "penalty": [], "seconds": []}
        for seed in seeds:
            acc, penalty, seconds = run(base, overrides, seed, os.path.join(RUNS, f"{name.replace(' ', '_')}-{seed}"))
            for k, v in zip(r, (acc, penalty, seconds)):
                r[k].append(v)
            print(f"{name} seed {seed}: test accuracy {acc:.3f} ({seconds:.0f} s)", flush=True)
    text = (table(results, es_seconds) + f"\n\nES: {state['iteration']} iterations x {base.es_population} "
            f"candidates + the centre, {base.es_inner_steps} steps each, {es_seconds:.0f} s; best validation score "
            f"{state['best_fitness']:.3f} (the centre of iteration {state['best_iteration']}). "
            f"Total {time.perf_counter() - t0:.0f} s.")
    print(text)
    with open(os.path.join(DOCS, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(DOCS, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "es_seconds": es_seconds, "arms": results, "es_history": state["history"]}, f,
                  indent=1)
    try:
        logs.plot_mirror([learned], os.path.join(DOCS, "mirror.png"))
        logs.plot_mirror([learned], os.path.join(DOCS, "mirror_weighted.png"), base.mirror_coefficient, base.beta)
    except ValueError as e:
        print(f"no plot: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
