"""The package's import layers, read from the source (every import, lazy ones included).

Dependencies point one way: configs <- ops <- nn <- convert <- models <- the state, checkpoint
and sharding layer of train/ <- evaluation <- the trainer and the exporter <- predict / main.
A module imports only modules of its own layer or of layers before it, and data/ is read only
by train/, evaluation/ and the entry points (never by ops, nn or models). `make lint` runs this
file too.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmad_jax"

# Ordered layers: (name, module prefixes). The most specific prefix decides.
LAYERS = (
  ("configs", ("dmad_jax.configs",)),
  ("ops", ("dmad_jax.ops",)),
  ("nn", ("dmad_jax.nn",)),
  ("convert", ("dmad_jax.convert",)),
  ("models", ("dmad_jax.models",)),
  ("data", ("dmad_jax.data",)),
  (
    "train infrastructure",
    (
      "dmad_jax.train.state",
      "dmad_jax.train.checkpoint",
      "dmad_jax.train.sharding",
      "dmad_jax.train.optim",
      "dmad_jax.train.durations",
      "dmad_jax.train.writers",
      "dmad_jax.train.preflight",
      "dmad_jax.train.distributed",
    ),
  ),
  ("evaluation", ("dmad_jax.evaluation",)),
  ("trainer", ("dmad_jax.train.trainer", "dmad_jax.train.export", "dmad_jax.train")),
  ("entry points", ("dmad_jax.predict", "dmad_jax.main", "dmad_jax.__main__", "dmad_jax")),
)
# Layers that may read data/ (besides data itself).
READ_DATA = {"train infrastructure", "evaluation", "trainer", "entry points"}


def _modules():
  mods = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


def _layer(module: str) -> int:
  best, best_len = None, -1
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best_len:
        best, best_len = i, len(p)
  assert best is not None, module
  return best


def _imports(mods):
  """module -> set of dmad_jax modules it imports (resolved to existing modules)."""

  def resolve(name):
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name or None

  edges = {}
  for m, path in mods.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for n in names:
        if n.startswith("dmad_jax"):
          r = resolve(n)
          if r and r != m:
            targets.add(r)
    edges[m] = targets
  return edges


def test_every_import_points_down_the_layers():
  mods = _modules()
  edges = _imports(mods)
  wrong = []
  for m, targets in edges.items():
    lm = _layer(m)
    for t in sorted(targets):
      lt = _layer(t)
      if lt > lm:
        wrong.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})")
      elif LAYERS[lt][0] == "data" and LAYERS[lm][0] not in READ_DATA | {"data"}:
        wrong.append(f"{m} ({LAYERS[lm][0]}) reads data/: {t}")
  assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
  mods = _modules()
  edges = _imports(mods)
  # Package __init__ files only re-export: an import of a package is an import of the module
  # that defines the name, so they are left out as sources (as Python resolves them lazily where
  # they must be, e.g. dmad_jax.train's entry points).
  edges = {m: t for m, t in edges.items() if mods[m].name != "__init__.py"}
  index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in edges:
    if v not in index:
      visit(v)
  assert not cycles, cycles
