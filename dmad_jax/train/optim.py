"""Optimizers from the config: AdamW or Adam with a schedule and per-group learning-rate
multipliers."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from dmad_jax.configs import schema

# The keys of an optimizer section (config.optimizer, or a parameter group's own section).
OPTIMIZER_KEYS = (
  "name",
  "lr",
  "b1",
  "b2",
  "eps",
  "weight_decay",
  "schedule",
  "power",
  "warmup_steps",
  "lr_multipliers",
  "grad_clip_norm",
)


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Base learning-rate schedule.

  ``cfg.schedule``: "cosine" (DMAD's CosineAnnealingLR to 0 over the run, here per step rather
  than per epoch, with ``cfg.warmup_steps`` of linear warm-up), "constant", or "poly"
  (``lr * (1 - step / total_steps) ** cfg.power``, IGD's per-iteration decay; power 0.9 unless
  given).
  """
  warmup = int(cfg.get("warmup_steps", 0))
  if cfg.schedule == "poly":
    if warmup:
      raise ValueError("optimizer.schedule 'poly' has no warm-up: set warmup_steps=0")
    return optax.polynomial_schedule(
      cfg.lr, 0.0, float(cfg.get("power", 0.9)), max(int(total_steps), 1)
    )
  if cfg.schedule == "constant":
    sched = optax.constant_schedule(cfg.lr)
    if warmup:
      sched = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), sched], [warmup])
    return sched
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0 if warmup else cfg.lr, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=0.0
    )
  raise ValueError(
    f"optimizer.schedule must be 'cosine', 'constant' or 'poly', got {cfg.schedule!r}"
  )


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_groups(params, multipliers: dict[str, float]) -> Any:
  """Labels every parameter with the first regex of ``multipliers`` matching its path, or
  "default". Paths are "/"-joined names, e.g. "template" or "encoder/conv1/Conv_0/kernel"."""
  patterns = [(re.compile(p), p) for p in multipliers]

  def label(path, _):
    name = _path_name(path)
    for rx, p in patterns:
      if rx.search(name):
        return p
    return "default"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
  cfg, total_steps: int, params, *, where: str = "optimizer"
) -> optax.GradientTransformation:
  """AdamW (torch semantics: decoupled weight decay on every parameter, as DMAD's code does) or
  Adam (torch semantics: ``weight_decay`` is an L2 term added to the gradient before the moments,
  as IGD's code uses it).

  Config keys: ``name`` ("adamw" or "adam"), ``lr``, ``b1``, ``b2``, ``eps``, ``weight_decay``,
  ``schedule``, ``warmup_steps``, ``lr_multipliers`` ({path regex: multiplier}, e.g.
  ``{"template": 50.0}`` for DMAD's background template) and ``grad_clip_norm`` (0 = off).
  ``where`` names the section in messages (``config.<where>``).
  """
  schema.check_keys(f"config.{where}", cfg.keys(), OPTIMIZER_KEYS)

  def build(mult: float):
    base = learning_rate_schedule(cfg, total_steps)
    lr = (lambda step: base(step) * mult) if mult != 1.0 else base
    if cfg.name == "adamw":
      return optax.adamw(lr, cfg.b1, cfg.b2, cfg.get("eps", 1e-8), weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
      adam = optax.adam(lr, cfg.b1, cfg.b2, cfg.get("eps", 1e-8))
      wd = float(cfg.get("weight_decay", 0.0))
      return optax.chain(optax.add_decayed_weights(wd), adam) if wd else adam
    raise ValueError(f"optimizer.name must be 'adamw' or 'adam', got {cfg.name!r}")

  multipliers = dict(cfg.get("lr_multipliers", {}) or {})
  if multipliers:
    transforms = {p: build(float(m)) for p, m in multipliers.items()}
    transforms["default"] = build(1.0)
    tx = optax.multi_transform(transforms, param_groups(params, multipliers))
  else:
    tx = build(1.0)
  if cfg.get("grad_clip_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx
