"""Shared pytest setup: float32 everywhere, fixed hypothesis profile."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402

settings.register_profile("dmad", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("dmad")
