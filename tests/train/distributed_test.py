"""distributed.initialize refuses bad arguments before it joins anything."""

import pytest

from dmad_jax.train import distributed


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(coordinator_address="localhost:1", num_processes=2), "--num_processes and --process_id"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2), r"not in \[0, 2\)"),
    (
      dict(
        coordinator_address="localhost:1",
        num_processes=2,
        process_id=0,
        heartbeat_timeout_seconds=0,
      ),
      "heartbeat_timeout_seconds must be a positive number of seconds, got 0",
    ),
    (
      dict(
        coordinator_address="localhost:1",
        num_processes=2,
        process_id=1,
        shutdown_timeout_seconds=-5,
      ),
      "shutdown_timeout_seconds must be a positive number of seconds, got -5",
    ),
  ],
)
def test_bad_arguments_are_refused_with_what_was_wrong(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)


def test_the_default_timeouts_are_jax_defaults():
  import inspect

  import jax

  params = inspect.signature(jax.distributed.initialize).parameters
  assert params["heartbeat_timeout_seconds"].default == distributed.HEARTBEAT_TIMEOUT_SECONDS
  assert params["shutdown_timeout_seconds"].default == distributed.SHUTDOWN_TIMEOUT_SECONDS


def test_the_dmad_flags_default_to_the_same_timeouts():
  from dmad_jax import main

  assert main._HEARTBEAT.default == distributed.HEARTBEAT_TIMEOUT_SECONDS
  assert main._SHUTDOWN.default == distributed.SHUTDOWN_TIMEOUT_SECONDS
