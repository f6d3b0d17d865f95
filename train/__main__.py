"""`python -m train`: compose the config, check it and the data, fit, evaluate, report."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from train import (
    checkpoint_io,
    config_checks,
    objectives,
    outputs,
    resolvers,
    storage,
    trackers,
    warmstart,
    weights,
)
from train.errors import UpweightError
from train.layout import CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE, STATS_FILE, join
from train.model import network_config
from train.module import RankingModule
from train.objective import Evaluation

resolvers.register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    try:
        return train(cfg)
    except Exception:
        # Hydra's own crash report echoes every command-line override, credentials included.
        traceback.print_exc()
        sys.exit(1)


def train(cfg: DictConfig) -> float | tuple[float, ...]:
    run_dir = cfg.paths.output_dir
    with bad_input(run_dir):  # every value and every split checked before anything is written
        config = container(cfg)
        config_checks.check(config, objectives.sweeper_directions())
        L.seed_everything(cfg.seed, workers=True)
        # sharding=torchrec: tables sharded over the ranks; none: whole on every rank (DDP)
        engine = instantiate(cfg.sharding)
        engine.check(config)  # what it cannot honour, before the data is read
        scheme = instantiate(cfg.weights)
        model_config = container(cfg.model)  # the network's, and its heads' training (multi-task)
        head_schemes = weights.head_schemes(model_config.get("head_weights"))
        data = instantiate(cfg.data)
        stats = data.prepare(scheme)
        spec = data.spec  # with the vocabularies of the training split
        evaluation = Evaluation(
            cfg.xauc_pairs,
            cfg.seed,
            join(run_dir, PREDICTIONS_FILE),
            cfg.metrics.ndcg_k,
            weights.gain_scheme(cfg.metrics.ndcg_gain),
        )
        goals = objectives.check(  # exact now: which behaviours are continuous is measured
            config.get("objectives"),
            objectives.logged(
                spec.behaviour_names,
                scheme.label,
                spec.oracle_names,
                model_config.get("heads") or (),
                stats.continuous,
                evaluation.ndcg_key(scheme.label),
            ),
        )
        network = instantiate(network_config(model_config))
        module = RankingModule(
            engine.build(network, spec, cfg.seed),
            scheme,
            spec,
            stats,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
            evaluation=evaluation,
            nonfinite=cfg.nonfinite,
            model_config=model_config,
            head_schemes=head_schemes,
            balance=model_config.get("balance"),
        )
        if cfg.init_from:  # weights only, checked against this run's model; a run folder's best
            warmstart.start(cfg, module, data, spec)  # and init_schedule; prints on rank 0
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
        trainer: L.Trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            # every logger selected (`logger=[csv,mlflow]`), less unreachable trackers
            # (the config as a warm start left it)
            logger=trackers.connect(
                [instantiate(c) for c in cfg.logger.values() if c], container(cfg)
            ),
            plugins=checkpoint_io.plugins(),
            strategy=engine.strategy(cfg.trainer.strategy),
        )
        data.check_device(trainer.strategy.root_device)  # data.device=cuda on a CUDA run only
        # ckpt_path, or with resume=auto the newest loadable checkpoint of this run folder
        ckpt_path = checkpoint_io.select_checkpoint(
            cfg.resume, cfg.ckpt_path, checkpoint_io.folders(trainer)
        )
    if trainer.is_global_zero:
        storage.write_text(join(run_dir, CONFIG_FILE), outputs.config_yaml(container(cfg)))
        storage.write_text(join(run_dir, STATS_FILE), stats.to_json())

    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    best = (
        "best"
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
        else None
    )
    trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)
    metrics |= module.test_results

    if trainer.is_global_zero:
        storage.write_json(join(run_dir, METRICS_FILE), metrics)
        trackers.finish(trainer, run_dir, metrics)  # final metrics, files; closes their runs
        print(f"\n{scheme.describe()}\n{outputs.format_table(metrics, data.spec.behaviour_names)}")
        print(f"run folder: {run_dir}")
    if torch.distributed.is_initialized():  # under torchrun rank 0 may abort at exit without it
        torch.distributed.destroy_process_group()
    if goals:  # what an Optuna search optimises: the best model's validation metrics
        return objectives.values(goals, metrics)
    return metrics.get(cfg.monitor.replace("val/", "test/", 1), float("nan"))


@contextmanager
def bad_input(run_dir: str) -> Iterator[None]:
    """Input a user can fix ends the job with `error: <what, where, expected>`, no traceback,
    and no run folder left behind (Hydra wraps errors raised inside the seams)."""
    try:
        yield
    except (UpweightError, InstantiationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, UpweightError):
            raise
        storage.remove_if_empty(run_dir)
        sys.exit(f"error: {cause}")


def container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


if __name__ == "__main__":
    main()
