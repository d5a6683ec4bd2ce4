"""Training: ``train_and_evaluate(config, workdir)`` and ``export_train_step(config, ...)``.

The package also holds what training and inference share (state, checkpoints, sharding,
optimizers, durations, writers); importing one of those does not import the trainer, which
itself uses the evaluation package, so the two entry points here are loaded on first use.
"""

__all__ = ["export_train_step", "train_and_evaluate"]


def __getattr__(name):
  if name == "train_and_evaluate":
    from dmad_jax.train.trainer import train_and_evaluate

    return train_and_evaluate
  if name == "export_train_step":
    from dmad_jax.train.export import export_train_step

    return export_train_step
  raise AttributeError(f"module 'dmad_jax.train' has no attribute {name!r}")
