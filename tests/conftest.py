"""Shared pytest setup: float32 everywhere, fixed hypothesis profile."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and its subprocesses: many tests compile
# the same tiny models (in process, through the CLI, on fake devices).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _partitioning_rules_hash() -> str:
  import hashlib

  with open(os.path.join(_ROOT, "dmad_jax", "ops", "cpu_kernels.py"), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


# Programs with the CPU kernels' custom_partitioning rules carry a per-process callback id in
# their IR, so by default the persistent cache never hits for them (jax-ml/jax#21159): every
# process recompiled its train step (measured: 7.5 s of a 24 s, 4-device `dmad train` of the
# tiny digits config; 12 s with the id left out of the key). Leaving it out is safe as long as
# the partitioning rules do not change under the same IR, so the cache directory is keyed by the
# module that holds them.
os.environ.setdefault("JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY", "1")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(_ROOT, ".pytest_cache", "jax-" + _partitioning_rules_hash()),
)

# The suite compiles several hundred tiny programs, so XLA:CPU's code generation dominates its
# time. Tests compile at -O0 with XLA's older (non-MLIR) fusion emitters unless XLA_FLAGS already
# chooses either. Measured on 2 cores, cold cache, a 4-step `train_and_evaluate` of the runlocal
# digits config: XLA compile 24.8 s at the default flags, 11.9 s at -O0, 6.8 s at -O0 with the
# older emitters (process CPU time 57.6, 32.2 and 22.0 s). These flags change float rounding, not
# the computation (4 training steps of the tiny digits config end with other parameter bits):
# every assertion is a property with a tolerance or a comparison of two runs under the same
# flags. The end-to-end test of the installed `dmad` script runs with the user's default flags
# (tests/cli_test.py drops every flag of SUITE_XLA_FLAGS).
SUITE_XLA_FLAGS = {
  "xla_backend_optimization_level": "--xla_backend_optimization_level=0",
  "xla_cpu_use_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
}
for _name, _flag in SUITE_XLA_FLAGS.items():
  if _name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


from hypothesis import settings  # noqa: E402

settings.register_profile("dmad", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("dmad")


import os as _os  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402

import pytest  # noqa: E402

ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))


@pytest.fixture
def dmad_cli():
  """Runs the installed ``dmad ARGS`` script in a subprocess, as a user does: no PYTHONPATH,
  cwd = repo root unless given."""

  def run(*args, cwd=ROOT):
    env = {k: v for k, v in _os.environ.items() if k != "PYTHONPATH"}
    return _subprocess.run(
      [_os.path.join(_os.path.dirname(_sys.executable), "dmad"), *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )

  return run


def pytest_collection_modifyitems(config, items):
  """Long tests first: with `--dist worksteal` (make test) a worker that runs out of tests takes
  the end of the other's queue, so the session ends on short tests rather than one worker running
  a long one alone."""
  del config

  def rank(item):  # multi-device runs are the longest (measured: 105-300 s), then slow ones
    if item.get_closest_marker("multidevice"):
      return 0
    return 1 if item.get_closest_marker("slow") else 2

  items.sort(key=rank)  # stable: the file order is kept within each rank


def write_dagm(root, class_id=1, *, pixels=64, n_train=8, n_test=6, seed=0):
  """A DAGM 2007 class in the release's layout (Class<k>/{Train,Test}, Label/Labels.txt with its
  header line, Label/<stem>_label.PNG elliptic masks): textured gray images; defective ones
  carry a bright ellipse where their mask is. One defective training image (left out by the
  source), half of the test images defective."""
  import numpy as np
  from PIL import Image, ImageDraw

  rng = np.random.default_rng(seed)
  for split, n, defective in (("Train", n_train, {1}), ("Test", n_test, set(range(0, n_test, 2)))):
    folder = _os.path.join(root, f"Class{class_id}", split)
    _os.makedirs(_os.path.join(folder, "Label"), exist_ok=True)
    lines = ["1"]
    for i in range(n):
      name = f"{i + 1:04d}.PNG"
      yy, xx = np.mgrid[:pixels, :pixels]
      base = 120 + 40 * np.sin(xx / 3.0 + rng.uniform(0, 6)) + rng.normal(0, 8, (pixels, pixels))
      img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
      mask_name = "0"
      if i in defective:
        y, x = rng.integers(pixels // 4, 3 * pixels // 4, 2)
        box = (x - pixels // 8, y - pixels // 10, x + pixels // 8, y + pixels // 10)
        ImageDraw.Draw(img).ellipse(box, fill=250)
        mask = Image.new("L", (pixels, pixels), 0)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        mask_name = name.replace(".PNG", "_label.PNG")
        mask.save(_os.path.join(folder, "Label", mask_name))
      img.save(_os.path.join(folder, name))
      lines.append(f"{i + 1}\t{int(i in defective)}\t{name}\t0\t{mask_name}")
    with open(_os.path.join(folder, "Label", "Labels.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return str(root)


@pytest.fixture
def dagm_writer():
  """:func:`write_dagm`, for tests (conftest is not importable under --import-mode=importlib)."""
  return write_dagm


@pytest.fixture(scope="session")
def oneclass_tfds_dir(tmp_path_factory):
  """A TFDS data dir holding small prepared copies of ``mnist``, ``fashion_mnist`` and
  ``cifar10`` (their real builders' features and versions, 3 training and 2 test images per
  class of random pixels), built by subclasses of the real builders that generate the examples
  instead of downloading them: ``tfds.data_source(name, data_dir=...)`` reads them as the real
  prepared data sets."""
  import numpy as np
  import tensorflow_datasets as tfds

  data_dir = str(tmp_path_factory.mktemp("tfds_oneclass"))

  def examples(shape, per_class, seed, with_id):
    rng = np.random.default_rng(seed)
    for c in range(10):
      for i in range(per_class):
        ex = {"image": rng.integers(0, 256, shape, dtype=np.uint8), "label": c}
        if with_id:
          ex["id"] = f"{seed}_{c}_{i}"
        yield f"{seed}_{c}_{i}", ex

  builders = (
    (tfds.image_classification.MNIST, (28, 28, 1), False),
    (tfds.image_classification.FashionMNIST, (28, 28, 1), False),
    (tfds.image_classification.Cifar10, (32, 32, 3), True),
  )
  for base, shape, with_id in builders:

    def split_generators(self, dl_manager, shape=shape, with_id=with_id):
      del self, dl_manager
      return {"train": examples(shape, 3, 0, with_id), "test": examples(shape, 2, 1, with_id)}

    # The class name gives the builder (and data) name; skip_registration keeps the real one.
    cls = type(
      base.__name__, (base,), {"_split_generators": split_generators}, skip_registration=True
    )
    cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


@pytest.fixture(scope="session")
def experiment_script():
  """``load(name)``: the module of ``experiments/<name>.py``, imported from its file (the
  experiments are scripts, not a package)."""
  import importlib.util

  def load(name):
    path = _os.path.join(ROOT, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  return load


@pytest.fixture
def run_notebook(tmp_path):
  """``run(name) -> (summary, pictures)``: ``colab/<name>`` run top to bottom by
  ``colab/execute.py`` (a fresh kernel, cwd ``colab/``, as a user runs it) with its small
  settings (``DMAD_NOTEBOOK_SMALL=1``) and its work directory under ``tmp_path``; ``summary`` is
  the ``summary.json`` its last cell writes there (what the notebook computed), ``pictures`` the
  number of images its cells displayed."""
  import json

  import nbformat

  def run(name):
    workdir, out = tmp_path / name.removesuffix(".ipynb"), tmp_path / "executed"
    env = {k: v for k, v in _os.environ.items() if k not in ("DMAD_REPO", "PYTHONPATH")}
    env.update(DMAD_NOTEBOOK_SMALL="1", DMAD_NOTEBOOK_WORKDIR=str(workdir))
    script = _os.path.join(ROOT, "colab", "execute.py")
    proc = _subprocess.run(
      [_sys.executable, script, "--out", str(out), name],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    nb = nbformat.read(out / name, as_version=4)
    pictures = sum(
      "image/png" in o.get("data", {})
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.get("outputs", [])
    )
    with open(workdir / "summary.json") as f:
      return json.load(f), pictures

  return run
