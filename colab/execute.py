"""Runs notebooks of this folder top to bottom and stores their outputs in place.

  .venv/bin/python colab/execute.py                      # every notebook, full settings
  .venv/bin/python colab/execute.py video.ipynb          # one notebook
  DMAD_NOTEBOOK_SMALL=1 .venv/bin/python colab/execute.py --out /tmp/nb quickstart.ipynb

The committed notebooks hold the outputs of this command's full run (pictures included); the
test suite runs the same notebooks through this script with small settings
(``DMAD_NOTEBOOK_SMALL=1``, ``--out``) in a temporary work directory and asserts on what they
compute. Each notebook runs in a fresh kernel whose working directory is ``colab/``, as when a
user opens it from a checkout.
"""

import argparse
import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def execute(path: str, *, timeout: int = 1800) -> nbformat.NotebookNode:
  """``path`` executed top to bottom in a fresh ``python3`` kernel (cwd: this folder)."""
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}
  ).execute()
  return nb


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="*", help="file names in colab/ (default: all)")
  parser.add_argument("--out", help="write the executed notebooks to this folder instead")
  args = parser.parse_args(argv)
  names = args.notebooks or sorted(os.path.basename(p) for p in glob.glob(f"{HERE}/*.ipynb"))
  for name in names:
    path = os.path.join(HERE, os.path.basename(name))
    start = time.time()
    print(f"{name}: running ...", flush=True)
    nb = execute(path)
    out = path
    if args.out:  # a copy elsewhere; the committed notebook is left as it is
      os.makedirs(args.out, exist_ok=True)
      out = os.path.join(args.out, os.path.basename(name))
    nbformat.write(nb, out)
    print(f"{name}: done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  sys.exit(main())
