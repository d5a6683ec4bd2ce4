"""``python -m dmad_jax train|eval ...``: see dmad_jax.main."""

from dmad_jax.main import run

run()
