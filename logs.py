"""
What a run shows: loggers, the completions table, the run summary, plots. This file imports nothing of ours.

metrics.jsonl (one row per logged step, written by train.py) is always on and is the source of truth;
the loggers mirror its numbers elsewhere:

    loggers=["tensorboard"]   output_dir/tensorboard (tensorboard --logdir OUTPUT_DIR/tensorboard)
    loggers=["wandb"]         a Weights & Biases run; WANDB_MODE=offline or disabled is honoured

Each is an optional extra (pip install tensorboard / wandb), checked at start-up. Plots are drawn
from metrics.jsonl after (or during) a run with `python train.py plot OUTPUT_DIR [--out DIR]`,
which needs matplotlib.
"""
import argparse
import difflib
import importlib
import json
import numbers
import os
import sys
from types import SimpleNamespace

LOGGERS = ("jsonl", "none", "tensorboard", "wandb")  # jsonl is always on; none adds nothing

# The figures of `plot`: file name, title, and which metrics it draws (names, or a test on a name).
FIGURES = (
    ("reward", "reward", lambda k: k == "reward" or k.startswith("rewards/") and not k.endswith("_std")),
    ("accuracy", "accuracy", ("accuracy",)),
    ("completion_length", "completion length (tokens)", ("completion_length", "completion_length_max")),
    ("entropy", "entropy (nats / token)", ("entropy",)),
    ("regulariser", "divergence from the reference", ("bregman", "kl", "prob_l2", "divergence")),
    ("grad_norm", "gradient norm (before clipping)", ("grad_norm",)),
    ("lr", "learning rate", ("lr",)),
    ("eval", "held-out evaluation", lambda k: k.startswith("eval/")),
)


def _need(module, who):
    """Import an optional extra, or a ValueError with its pip line."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{who} needs the {module} package: pip install {module}") from None


def _scalars(metrics):
    """The numeric entries of a metrics row, less its step: what a logger can plot."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


# ---------------------------------------------------------------------------- loggers

def check_loggers(names):
    """Validate logger names (a list, or one comma-separated string) and that their packages import.
    Returns the loggers to open (jsonl and none dropped)."""
    names = names.split(",") if isinstance(names, str) else list(names or ())
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    for name in names:
        if name not in LOGGERS:
            close = difflib.get_close_matches(name, LOGGERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"loggers: unknown logger {name!r}{hint}; choose from {', '.join(LOGGERS)}")
    wanted = list(dict.fromkeys(n for n in names if n not in ("jsonl", "none")))
    for name in wanted:
        _need(name, f"loggers: {name}")
    return wanted


def _tensorboard(output_dir):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))

    def log(metrics, step):
        for k, v in _scalars(metrics).items():
            writer.add_scalar(k, v, step)

    def close():
        writer.flush()
        writer.close()
    return SimpleNamespace(log=log, close=close)


def _wandb(output_dir, run_name, config, project, entity):
    import wandb
    run = wandb.init(project=project or "nmgrpo", entity=entity, name=run_name, dir=output_dir, config=config)
    return SimpleNamespace(log=lambda metrics, step: run.log(_scalars(metrics), step=step), close=run.finish)


def open_loggers(names, output_dir, run_name=None, config=None, wandb_project=None, wandb_entity=None):
    """Open the named loggers; each has .log(metrics, step) (numbers only, names as tags) and .close()."""
    os.makedirs(output_dir, exist_ok=True)
    opened = []
    for name in check_loggers(names):
        if name == "tensorboard":
            opened.append(_tensorboard(output_dir))
        else:
            opened.append(_wandb(output_dir, run_name, config, wandb_project, wandb_entity))
    return opened


# ---------------------------------------------------------------------------- the terminal

def _fit(s, n):
    """s cut to n characters, with an ellipsis where it was cut."""
    return s if len(s) <= n else s[:max(n - 1, 0)] + "…"


def _cut(text, n):
    """Whitespace collapsed, then cut to n characters."""
    return _fit(" ".join(str(text).split()), n)


def _num(v, n):
    """A number right-aligned in n characters: 2 decimals, fewer where they do not fit ('-' for none)."""
    if not isinstance(v, numbers.Real):
        return "-".rjust(n)
    s = f"{v:.2f}"
    if len(s) > n:
        s = f"{v:.0f}" if len(f"{v:.0f}") <= n else f"{v:.0e}"
    return s.rjust(n)


def completions_table(rows, width=100, max_rows=4):
    """A few completions as a text table of `width` columns: prompt and completion heads, each reward
    function's value, the total and the advantage. Rows: dicts of prompt, completion, reward,
    advantage and rewards ({name: value})."""
    if not rows:
        return ""
    names = list(dict.fromkeys(k for r in rows for k in (r.get("rewards") or {})))
    heads = names + ["total", "adv"]
    nums = [min(max(len(h), 6), 10) for h in heads]
    text = width - sum(nums) - 2 * (len(nums) + 1)  # columns are two spaces apart
    if text < 30:  # many rewards: narrow their columns before the text ones
        nums = [6] * len(nums)
        text = width - sum(nums) - 2 * (len(nums) + 1)
    text = max(text, 16)
    widths = [text // 3, text - text // 3] + nums

    def line(cells):
        return _fit("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))),
                    width)

    header = line([_cut(h, w) for h, w in zip(["prompt", "completion"] + heads, widths)])
    out = [header, "-" * len(header)]
    for r in rows[:max_rows]:
        values = [(r.get("rewards") or {}).get(n) for n in names] + [r.get("reward"), r.get("advantage")]
        out.append(line([_cut(r.get("prompt", ""), widths[0]), _cut(r.get("completion", ""), widths[1])]
                        + [_num(v, w) for v, w in zip(values, nums)]))
    if len(rows) > max_rows:
        out.append(f"… {len(rows) - max_rows} more")
    return "\n".join(out)


def _hms(seconds):
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _evals(what, ev):
    scores = " ".join(f"{k.removeprefix('eval/')}=" + (f"{v:.4g}" if isinstance(v, numbers.Real) else str(v))
                      for k, v in ev.items() if k != "step")
    return f"{what} eval" + (f" (step {ev['step']})" if "step" in ev else "") + f": {scores}"


def run_summary(steps, wall_time_s, tokens_per_s, best_eval=None, last_eval=None, checkpoint=None,
                plots_dir=None, output_dir=None):
    """The end-of-run lines: steps, wall time, throughput, the best and last eval (dicts of eval/*
    metrics, with their "step"), and where the checkpoint, logs and plots are."""
    out = [f"done: {steps} steps in {_hms(wall_time_s)}"
           + (f", {tokens_per_s:,.0f} tokens/s" if tokens_per_s is not None else "")]
    if best_eval:
        out.append(_evals("best", best_eval))
    if last_eval:
        out.append(_evals("last", last_eval))
    if checkpoint:
        out.append(f"checkpoint: {checkpoint}")
    if output_dir:
        out.append(f"logs: {os.path.join(output_dir, 'metrics.jsonl')}, {os.path.join(output_dir, 'samples.jsonl')}")
    if plots_dir:
        out.append(f"plots: {plots_dir}")
    elif output_dir:
        out.append(f"plots: python train.py plot {output_dir}")
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots

def read_metrics(output_dir):
    """The rows of output_dir/metrics.jsonl, in step order (a line cut short by a kill is skipped)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"plot: {path} not found: run training first (it writes metrics.jsonl)")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), numbers.Real):
                rows.append(row)
    if not rows:
        raise ValueError(f"plot: {path} has no metrics rows: run training first")
    return sorted(rows, key=lambda r: r["step"])


def plot(output_dir, out_dir=None):
    """Draw metrics.jsonl's curves against step as PNGs in out_dir (default output_dir/plots): reward
    (total and per function), accuracy, completion length, entropy, the regulariser, grad norm, lr,
    eval scores; a metric the run did not log is skipped. Returns the paths written."""
    rows = read_metrics(output_dir)
    _need("matplotlib", "plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    out_dir = out_dir or os.path.join(output_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    paths = []
    for stem, title, which in FIGURES:
        names = [k for k in keys if which(k)] if callable(which) else [k for k in which if k in keys]
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), numbers.Real)] for k in names}
        series = {k: pts for k, pts in series.items() if pts}
        if not series:
            continue
        fig = Figure(figsize=(7, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for k, pts in series.items():
            total = {"color": "black", "linewidth": 2, "zorder": 3} if k == "reward" else {}  # over its parts
            ax.plot(*zip(*pts), label=k, marker="o" if len(pts) <= 30 else None, markersize=3, **total)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
        paths.append(os.path.join(out_dir, f"{stem}.png"))
        fig.savefig(paths[-1], dpi=100)
    return paths


def main(argv):
    """`python train.py plot OUTPUT_DIR [--out DIR]` (argv: what follows `plot`)."""
    parser = argparse.ArgumentParser(prog="train.py plot", description="Plot a run's metrics.jsonl as PNGs.")
    parser.add_argument("output_dir", help="the run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default OUTPUT_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot(args.output_dir, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0
