"""Checking config sections: the one way every part of dmad_jax reads a section of a config.

A detector, a data source, the trainer and calibration each own some sections of the config
(``config.model``, ``config.data``, ``config.calibration``, ...). Each declares the keys it reads
(a dataclass, such as a Flax module, or a mapping of defaults) and reads its section through
:func:`section`, which refuses a key it does not know with the closest known one, so a typo
fails at start-up instead of leaving a setting silently at its default.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ConfigError", "check_keys", "field_names", "plain", "section"]

# Fields of a Flax module that are not configuration.
_MODULE_FIELDS = ("parent", "name")


class ConfigError(ValueError):
  """A config that cannot work: an unknown key or an impossible value."""


def plain(value: Any) -> Any:
  """A ConfigDict / dict / list as plain Python values: dicts of tuples, recursively."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return tuple(plain(v) for v in value)
  return value


def field_names(schema: Any) -> tuple[str, ...]:
  """The keys a schema accepts: the init fields of a dataclass (a Flax module's attributes), or
  the keys of a mapping of defaults."""
  if dataclasses.is_dataclass(schema):
    return tuple(
      f.name for f in dataclasses.fields(schema) if f.init and f.name not in _MODULE_FIELDS
    )
  if isinstance(schema, Mapping):
    return tuple(schema)
  return tuple(schema)


def check_keys(where: str, given: Iterable[str], known: Iterable[str]) -> None:
  """Raises a :class:`ConfigError` naming every key of ``given`` not in ``known``.

  Args:
    where: the section, e.g. ``"config.model"``, for the message.
    given: the keys the config has.
    known: the keys its reader accepts.
  """
  known = sorted(known)
  unknown = [k for k in given if k not in known]
  if not unknown:
    return
  parts = []
  for key in unknown:
    close = difflib.get_close_matches(key, known, n=1)
    parts.append(f"{where}.{key}" + (f" (did you mean {close[0]!r}?)" if close else ""))
  raise ConfigError(
    f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
    f"{where} accepts: {', '.join(known)}"
  )


def section(config: Any, name: str, schema: Any, *, extra: Iterable[str] = ()) -> dict:
  """``config.<name>`` as a plain dict, checked against ``schema``.

  Args:
    config: a ConfigDict (or mapping).
    name: the section's key; a missing or None section reads as empty.
    schema: a dataclass (its init fields are the known keys; the values are returned as given,
      for ``schema(**values)``) or a mapping of defaults (the result is the defaults updated with
      the given values).
    extra: further keys the reader accepts besides the schema's.

  Returns:
    The section's values (lists turned into tuples).

  Raises:
    ConfigError: for a key the schema does not know, naming the closest known one.
  """
  given = config.get(name, None) if hasattr(config, "get") else None
  given = plain(given) if given is not None else {}
  if not isinstance(given, Mapping):
    raise ConfigError(f"config.{name} must be a section (a ConfigDict), got {given!r}")
  check_keys(f"config.{name}", given, (*field_names(schema), *extra))
  if isinstance(schema, Mapping):
    return {**plain(dict(schema)), **given}
  return dict(given)
