"""The config-arg syntax of the video configs: ``key=value`` items separated by ``;`` or ``,``.

``configs/ped2_pdm.py:root=/data/ped2;labels=L.npy;runlocal`` — a bare ``runlocal`` switches
to the tiny test-sized variant.
"""

from __future__ import annotations

import re


def parse(name: str, arg: str | None, defaults: dict, *, choices: dict | None = None) -> dict:
  """``defaults`` updated from ``arg``; values are cast to the type of their default.

  Args:
    name: the config's name, for error messages.
    arg: the text after ``:`` in ``--config``.
    defaults: every accepted key with its default (``runlocal`` is always accepted).
    choices: allowed values per key.

  Raises:
    ValueError: on an unknown key, a value not in ``choices``, or a missing ``root``.
  """
  out = {**defaults, "runlocal": False}
  for item in filter(None, re.split(r"[;,]", arg or "")):
    key, _, value = item.partition("=")
    if key == "runlocal":
      out["runlocal"] = True
    elif key in defaults:
      default = defaults[key]
      out[key] = type(default)(value) if isinstance(default, int | float) else value
    else:
      raise ValueError(
        f"{name}: unknown config arg {item!r} ({', '.join([*defaults, 'runlocal'])})"
      )
  for key, allowed in (choices or {}).items():
    if out[key] not in allowed:
      raise ValueError(f"{name}: {key} must be one of {sorted(allowed)}, got {out[key]!r}")
  if "root" in defaults and not out["root"]:
    raise ValueError(f"{name}: give the data root, e.g. configs/{name}.py:root=/data/...")
  return out
