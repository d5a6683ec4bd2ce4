"""dmad_jax.train.host_memory: the CPU scheduler flag and returning freed heap pages."""

import os
import subprocess
import sys

from dmad_jax.train import host_memory


def test_memory_scheduler_flag_is_added_once_and_a_users_choice_stands():
  env = {}
  assert host_memory.use_memory_scheduler(env)
  assert env["XLA_FLAGS"] == host_memory.CPU_SCHEDULER_FLAG
  assert not host_memory.use_memory_scheduler(env)  # already there: not added twice
  env = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true --xla_foo=1"}
  assert not host_memory.use_memory_scheduler(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true --xla_foo=1"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert host_memory.use_memory_scheduler(env)
  assert env["XLA_FLAGS"].split() == [
    "--xla_force_host_platform_device_count=8",
    host_memory.CPU_SCHEDULER_FLAG,
  ]


_FREED = """
import json, resource, sys
from dmad_jax.train import host_memory

def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 2**10  # MiB

# ~300 MiB of 1000-byte objects (allocated by malloc itself, not Python's small-object arenas),
# then one more kept alive above them: glibc cannot shrink the heap past it on its own.
objects = [bytes(1000) for _ in range(300_000)]
tail = bytes(1000)
held = rss()
del objects
freed = rss()
trimmed = host_memory.release()
print(json.dumps({"held": held, "freed": freed, "released": rss(), "trimmed": trimmed}))
"""


def test_release_returns_freed_heap_pages_to_the_os():
  """Small freed objects stay in the resident set until released (glibc keeps the pages)."""
  out = subprocess.run(
    [sys.executable, "-c", _FREED], capture_output=True, text=True, check=True, cwd=os.getcwd()
  )
  m = __import__("json").loads(out.stdout.strip().splitlines()[-1])
  assert m["trimmed"]  # this is a glibc system
  assert m["held"] > 200
  assert m["released"] < m["freed"] - 100, m
