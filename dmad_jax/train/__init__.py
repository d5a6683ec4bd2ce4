"""Training: ``train_and_evaluate(config, workdir)``."""

from dmad_jax.train.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
