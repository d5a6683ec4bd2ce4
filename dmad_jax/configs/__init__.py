"""Config building blocks that the files in ``configs/`` import, and loading a config file.

The experiment configs live in the repository's ``configs/`` folder, one ``get_config(arg)``
file per experiment with its launch command in the docstring. What several of them share (the
config-arg syntax, the PDM, DAAD and MVTec recipes) lives here, in the installed package, so a
config file imports only ``dmad_jax`` and loads the same way from any working directory: through
the ``dmad`` script, ``python -m dmad_jax``, :func:`load` or a notebook in ``colab/``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from dmad_jax.configs.common import parse_arg

__all__ = ["load", "load_module", "parse_arg"]


def load_module(path: str | os.PathLike):
  """Imports a config file by path (what ``--config`` does), independent of ``sys.path``.

  Raises:
    FileNotFoundError: when ``path`` is not a file.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  name = "dmad_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses and pickling look modules up by name
  spec.loader.exec_module(module)
  return module


def load(path: str | os.PathLike, arg: str | None = None):
  """``get_config(arg)`` of the config file at ``path``, e.g.
  ``load("configs/digits_pdm.py", "runlocal")``: the config ``--config path:arg`` gives."""
  module = load_module(path)
  return module.get_config(arg) if arg is not None else module.get_config()
