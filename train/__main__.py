"""`python -m train`: compose the config, check data and scheme, fit, evaluate, report."""

from __future__ import annotations

import sys
import traceback

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from train import fusion, outputs, resolvers, resume, warmstart
from train.data import DataError
from train.module import RankingModule
from train.weights import SchemeError

resolvers.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except Exception:
        # Hydra's own crash report echoes every command-line override, credentials included.
        traceback.print_exc()
        sys.exit(1)


def train(cfg: DictConfig) -> float:
    run_dir = cfg.paths.output_dir
    L.seed_everything(cfg.seed, workers=True)
    try:
        scheme = instantiate(cfg.weights)
        data = instantiate(cfg.data)
        stats = data.prepare(scheme)  # reads and checks every split: fail before writing
    except (SchemeError, DataError, InstantiationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, SchemeError | DataError):  # Hydra wraps errors of the seams
            raise
        outputs.remove_if_empty(run_dir)
        sys.exit(f"error: {cause}")

    model = instantiate(cfg.model)(data.spec.cardinalities, len(data.spec.dense))
    module = RankingModule(
        model,
        scheme,
        behaviours=data.spec.behaviour_names,
        continuous=stats.continuous,
        dense_mean=stats.dense_mean,
        dense_std=stats.dense_std,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        weight_scale=1.0 / data.weight_mean if scheme.normalize == "mean" else 1.0,
        oracle=data.spec.oracle_names,
        dense_fill=data.dense_fill,  # NaN in dense columns: training mean or 0
        xauc_pairs=cfg.xauc_pairs,
        seed=cfg.seed,
        artifact=outputs.artifact(container(cfg.model), data.spec, stats, scheme)
        | {"dense_fill": data.dense_fill},
        positive_mean=fusion.positive_means(stats),  # scales the weighted head of model=multihead
        predictions=f"{run_dir}/{fusion.PREDICTIONS_FILE}",  # every head's test probabilities
        nonfinite=cfg.nonfinite,  # stop | skip
    )
    if cfg.init_from:  # weights only, checked against this run's model before anything is written
        try:
            args = (cfg.init_from, data.spec, container(cfg.model), cfg.ckpt_path)
            print(warmstart.init_from(module, *args))
        except warmstart.WarmStartError as err:
            outputs.remove_if_empty(run_dir)
            sys.exit(f"error: {err}")
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate(cfg.logger), plugins=resume.plugins()
    )
    try:  # ckpt_path, or with resume=auto the newest loadable checkpoint of this run folder
        ckpt_path = resume.select_checkpoint(cfg.resume, cfg.ckpt_path, resume.folders(trainer))
    except resume.ResumeError as err:
        sys.exit(f"error: {err}")
    if trainer.is_global_zero:
        outputs.write_text(f"{run_dir}/config.yaml", outputs.config_yaml(container(cfg)))
        outputs.write_text(f"{run_dir}/stats.json", stats.to_json())

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
        outputs.write_json(f"{run_dir}/metrics.json", metrics)
        print(f"\n{scheme.describe()}\n{outputs.format_table(metrics, data.spec.behaviour_names)}")
        print(f"run folder: {run_dir}")
    if torch.distributed.is_initialized():  # under torchrun rank 0 may abort at exit without it
        torch.distributed.destroy_process_group()
    return metrics.get(cfg.monitor.replace("val/", "test/", 1), float("nan"))


def container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


if __name__ == "__main__":
    main()
