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
import re
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Output formats that hold text (pictures are left alone).
TEXT_OUTPUTS = ("text/plain", "text/html", "text/markdown", "application/json")


def repo_relative(nb: nbformat.NotebookNode, root: str = ROOT) -> int:
  """Rewrites, in place, the checkout's absolute paths in ``nb``'s outputs (the log lines and
  metrics name ``<root>/runs/...``) as paths relative to the repository, so that a committed
  notebook does not carry the machine it ran on. Returns how many were rewritten."""
  root = os.path.abspath(root)
  # ``<root>/x`` becomes ``x``; ``<root>`` alone (not followed by more of a name) becomes ``.``.
  pattern = re.compile(re.escape(root) + r"(/|(?![\w.-]))")
  count = 0

  def fix(value):
    nonlocal count
    if isinstance(value, list):
      return [fix(v) for v in value]
    if isinstance(value, str):
      value, n = pattern.subn(lambda m: "" if m.group(1) else ".", value)
      count += n
    return value

  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if "text" in out:
        out["text"] = fix(out["text"])
      for key in TEXT_OUTPUTS:
        if isinstance(out.get("data", {}).get(key), str | list):
          out["data"][key] = fix(out["data"][key])
  return count


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
    repo_relative(nb)
    out = path
    if args.out:  # a copy elsewhere; the committed notebook is left as it is
      os.makedirs(args.out, exist_ok=True)
      out = os.path.join(args.out, os.path.basename(name))
    nbformat.write(nb, out)
    print(f"{name}: done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  sys.exit(main())
