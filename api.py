"""AlignTune's Python entry point: create_rl_trainer(...) returns an RLTrainer over our Config.

    from api import create_rl_trainer
    results = create_rl_trainer(model_name="Qwen/Qwen3-0.6B", dataset_name="openai/gsm8k", algorithm="nmgrpo",
                                max_steps=100, batch_size=8, use_peft=True).train()

Keyword names are ours or AlignTune's (compat.py maps them); backend="trl" trains in TRL's GRPOTrainer
(trl_backend.py), else the native loop (train.py).
"""
import os
import time

import checkpoint
import compat
import config as config_lib
import configurator
import train


class RLTrainer:
    """What create_rl_trainer returns: .train() runs NMGRPO and returns the results dict."""

    def __init__(self, cfg):
        self.cfg, self.run, self.results, self.trl = cfg, None, None, None

    def train(self):
        """Train; the results dict under AlignTune's names (and ours: output_dir, checkpoint, steps)."""
        t0 = time.perf_counter()
        if self.cfg.backend == "trl":  # TRL's GRPOTrainer, kept for evaluate and save_model
            import trl_backend
            self.trl = trl_backend.build_trainer(self.cfg)
            out = trl_backend.fit(self.trl, self.cfg)
        else:
            self.run = train.setup(self.cfg)
            out = train.fit(self.run)
        metrics = out["metrics"]
        self.results = {"training_time": time.perf_counter() - t0, "final_loss": metrics.get("loss"),
                        "total_steps": out["steps"], "model_path": out["checkpoint"], "metrics": metrics,
                        "num_reward_functions": len(self.cfg.rewards or self.cfg.reward_functions or [None]),
                        "mirror_coefficient": self.cfg.mirror_coefficient,
                        "mirror_init_scale": self.cfg.mirror_init_scale, "divergence_type": self.cfg.divergence_type,
                        **out}
        return self.results

    def evaluate(self):
        """Held-out metrics (eval/accuracy, eval/reward) of the current weights (backend 'trl': TRL's evaluation).
        Under torchrun every process calls it: each evaluates its share of the prompts, then the sums are reduced."""
        if self.cfg.backend == "trl":
            import trl_backend
            self.trl = self.trl or trl_backend.build_trainer(self.cfg)
            self.trl.evaluate()
            return {k: v for k, v in self.trl.metrics_file.evals[-1].items() if k.startswith("eval/")}
        if self.run is None:
            self.run = train.setup(self.cfg)
        return train.evaluate(self.run)

    def save_model(self, path=None):
        """A checkpoint of the current weights (in output_dir unless `path`, a new or empty folder, or an
        earlier checkpoint); returns its folder. backend 'trl': TRL's save_model (output_dir unless `path`)."""
        if self.trl is not None:
            self.trl.save_model(path or self.cfg.output_dir)
            return path or self.cfg.output_dir
        if self.run is None:
            raise ValueError("save_model: nothing trained yet; call .train() first")
        busy = path and os.path.isdir(path) and os.listdir(path)
        if busy and not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise ValueError(f"save_model: {path!r} holds other files; give a new or empty folder")
        return checkpoint.save_checkpoint(self.run, path)


def create_rl_trainer(model_name=None, dataset_name=None, algorithm="nmgrpo", backend="auto", config=None, **kwargs):
    """AlignTune's entry point: a trainer over our Config. `config` is a YAML/JSON path or a mapping (either
    schema); keyword arguments (our field names or AlignTune's) win over it."""
    values = {}
    if config is not None:
        values = configurator.read_file(os.fspath(config)) if isinstance(config, (str, os.PathLike)) else dict(config)
        values = compat.from_nested(values, config_lib.FIELDS) if compat.is_nested(values) else compat.rename(values)
    if model_name is not None:
        values["model_name"] = model_name
    if dataset_name is not None:
        values["dataset_name"] = dataset_name
    given = compat.rename(kwargs)  # AlignTune's names (wandb_run_name, use_peft, ...)
    values.update(given)
    for key, value in compat.algo_settings(algorithm).items():  # what the algorithm implies, unless set
        values.setdefault(key, value)
    if "num_epochs" in given and "max_steps" not in given:
        values.setdefault("max_steps", -1)
    values.setdefault("backend", backend)
    return RLTrainer(config_lib.make(compat.fold_percent(values)))
