"""Runs every ``dmad ...`` command line that README.md and the configs' docstrings show, once,
exactly as written, on small data that this script creates, and reports which work.

  python experiments/check_documented_commands.py [--quick] [--json]
  python experiments/check_documented_commands.py --list            # extract and print only
  python experiments/check_documented_commands.py --only TEXT [-v]  # units containing TEXT
  python experiments/check_documented_commands.py --self-test-shim  # the shim on a fake dmad

Run it with the interpreter of the environment ``dmad`` is installed in (``.venv/bin/python``),
from any directory: the commands run from the repository root.

What it checks. The command texts are extracted at run time, never copied into this file:

* README.md: every fenced ```bash block, run as one bash script (as a reader would paste it:
  blocks set variables such as ``ARG=`` and loop; no ``set -e``, so a failed command does not
  hide the ones after it), and every inline code span that starts with ``dmad ``.
* configs/*.py: in each module docstring, the indented lines (two spaces) that contain ``dmad ``
  with the indented ``NAME=...`` lines before them and their backslash continuations, run as one
  bash script per docstring; and the docstring's inline ````dmad ...```` spans.

Every unit runs from the repository root with a PATH shim first on PATH: an executable ``dmad``
that runs the real one (``.venv/bin/dmad``) with the same arguments, stdin and output, and logs
each invocation (argv, exit status, seconds, last lines of output) to a JSONL file that this
script reads afterwards. Full recipes cannot finish on a small CPU machine, so the shim stops
``dmad train`` with SIGTERM as soon as the process has a SIGTERM handler (read from
/proc/<pid>/status: the trainer installs one around its training loop; with several processes
JAX's preemption notifier handles it and every process saves the same step) or it logs a
``step N/M (epoch ...)`` line; the trainer then finishes that step, saves it and exits 143
(``saved step N``), which the shim maps to 0: "trained to step N, stopped by SIGTERM".
``dmad eval --watch`` is stopped once it has (re)written ``<workdir>/eval/metrics_<step>.json``
for the workdir's latest checkpoint. Every other command (eval, calibrate, predict, video-auc,
convert-weights, extract-frames, config) runs unchanged and must exit 0. A documented command
that fails, times out (``--timeout``, per invocation) or never runs (an ``&&`` chain skipped it)
is a failure, and the exit status is then 1. The table (source, command, status, note) goes to
stdout; ``--json`` also writes experiments/results/documented_commands.json.

Data, created where the commands expect it (small images, resized by the configs): /data/bottle
(train/good, test/good, test/<defect>), /data/mvtec/<category> with ground_truth masks for every
category named by the commands, /data/dagm/Class<k> in the DAGM 2007 layout for every class
named, the raw UCSD Ped2 folders under $UCSD (the README links them into /data/ped2 itself),
tiny .avi videos under $AV and $ST (the README extracts them), Ped2 style frame folders under
$ST/testing/frames, the label files /data/frame_labels_*.npy (one
label per test frame after the first four of each video) and the templates /data/bkg_*.jpg.
/data/ped2, /data/avenue and /data/shanghai are removed first so that the README's own lines
create them; before a unit that uses one without creating it (a config docstring), this script
creates it when it is missing. Files that commands read at the repository root are created there
(``new1.png`` for ``dmad predict``; ``*.pth`` inputs of ``dmad convert-weights`` and literal
``weights=*.npz`` config args: torchvision's resnet18 for names with ``r18`` / ``resnet18``,
wide_resnet50_2 otherwise, with RANDOM weights, same architecture and state-dict keys, since the
ImageNet download cannot run here). Before the run
and after it, the ``runs/<name>`` folders the commands name are removed, and so are the files
this script or the commands created at the repository root (pre-existing ones are moved aside
and put back); ``--keep`` keeps them. /data and the scratch folder (/tmp/dmad_doc_check: shim,
scripts, logs, raw videos) are left in place. The README's MVTec loop trains 15 categories x 2
models; ``--quick`` shortens every ``for x in a b c ...; do`` list of names (not numbers) to its
first item and says so.

What it cannot check: lines that need other machines or the internet are listed, not run (``gcloud
compute tpus ...``, ``--coordinator_address`` of another host, ``srun``, the
``weights='IMAGENET1K_V1'`` download, the TFDS data sets of configs/oneclass_igd.py); inline spans
with placeholders (``DIR``, ``<x>``, ``L.npy``, ``...``) are listed as templates; the ```bash block
of ``make demo`` / ``make test`` holds no dmad command and is not run. Runs are stopped after one
step, so nothing here says that a recipe trains well or reaches its metrics, only that the command
starts, trains, checkpoints, evaluates, calibrates and predicts on data in the documented layout.
Docstrings of the package (dmad_jax/main.py, ...) are not read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = Path(os.environ.get("DMAD_CHECK_SCRATCH", "/tmp/dmad_doc_check"))
DATA = Path("/data")
MANIFEST = DATA / ".check_documented_commands.json"
RESULTS = REPO / "experiments" / "results" / "documented_commands.json"
DEFAULT_TIMEOUT = 1800.0  # seconds per dmad invocation


def portable(text: str) -> str:
  """``text`` with this machine's paths made relative: the repository's as relative paths, the
  scratch folder's as ``$SCRATCH``."""
  return text.replace(f"{REPO}/", "").replace(str(REPO), ".").replace(str(SCRATCH), "$SCRATCH")


# Lines that cannot run on this machine by their nature: (pattern, reason).
CANNOT_RUN = (
  (r"\bgcloud\s+compute\s+tpus\b", "needs a Cloud TPU pod slice (gcloud compute tpus ...)"),
  (
    r"--coordinator_address[= ](?!(?:localhost|127\.0\.0\.1)[:\s])(\S+)",
    "needs other hosts (coordinator {0})",
  ),
  (r"(?:^|[\s;&|#:(])srun\s", "needs a SLURM allocation (srun)"),
  (r"IMAGENET1K|weights=[\\'\"]*IMAGENET", "downloads ImageNet weights from the internet"),
  (
    r"configs/oneclass_\w+\.py|reproduce_tables\.py --table (?:mnist|fashion_mnist|cifar10)",
    "needs MNIST / Fashion-MNIST / CIFAR-10 prepared by TFDS (downloaded from the internet)",
  ),
)
# Shell words that can precede a command on the same line.
KEYWORDS = {"do", "then", "else", "elif", "{", "!", "time", "exec"}
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
VARIABLE = re.compile(r"\$(?:\{[^}]*\}|[A-Za-z_]\w*|[0-9@*#?$!-])")


# ---------------------------------------------------------------------------------------------
# Extraction.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
  """One documented command (or a listed line that is not run) and, after the run, its result."""

  source: str  # "README.md:312"
  line: int
  text: str  # as written, continuations joined
  kind: str  # run | skip | template | comment | mention | none
  reason: str = ""
  words: list[str] | None = None  # shell words after `dmad` (for matching invocations)
  in_loop: bool = False
  status: str = ""
  note: str = ""
  invocations: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Unit:
  """What runs as one bash script: a README block, a config docstring or an inline span."""

  uid: str  # "README.md:312"
  source: str  # "README.md"
  line: int
  kind: str  # "bash block" | "docstring" | "inline span" | "fence"
  listing: list[tuple[int, str, str]]  # (line, kind, text) of every logical line, for --list
  rows: list[Row]
  script: str = ""
  note: str = ""
  exit_status: int | None = None
  seconds: float = 0.0
  log: str = ""

  @property
  def runnable(self) -> bool:
    return any(r.kind == "run" for r in self.rows)


def logical_lines(lines: list[str], first: int) -> list[tuple[int, list[str]]]:
  """Joins backslash continuations: ``[(line number, physical lines)]``."""
  out, buf, start = [], [], None
  for i, line in enumerate(lines):
    if start is None:
      start = first + i
    buf.append(line)
    if line.rstrip("\n").endswith("\\") and not line.rstrip("\n").endswith("\\\\"):
      continue
    out.append((start, buf))
    buf, start = [], None
  if buf:
    out.append((start, buf))
  return out


def joined(physical: list[str]) -> str:
  """The text of a logical line: continuation backslashes dropped, pieces joined by a space."""
  pieces = [p.rstrip("\n") for p in physical]
  pieces = [p[:-1] if p.endswith("\\") else p for p in pieces]
  return " ".join(p.strip() for p in pieces if p.strip())


def split_segments(text: str) -> list[str]:
  """A shell line cut at unquoted ``;``, ``&``, ``&&``, ``|``, ``||`` (outside ``$(...)``), with
  a trailing ``#`` comment dropped."""
  segments, cur, quote, depth, i = [], [], None, 0, 0
  while i < len(text):
    c = text[i]
    if quote:
      cur.append(c)
      if c == "\\" and quote == '"' and i + 1 < len(text):
        cur.append(text[i + 1])
        i += 1
      elif c == quote:
        quote = None
    elif c in "'\"":
      quote = c
      cur.append(c)
    elif c == "$" and text[i + 1 : i + 2] == "(":
      depth += 1
      cur.append("$(")
      i += 1
    elif c == "(" and depth:
      depth += 1
      cur.append(c)
    elif c == ")" and depth:
      depth -= 1
      cur.append(c)
    elif depth == 0 and c == "#" and (not cur or cur[-1].isspace()):
      break
    elif depth == 0 and c in ";&|" and not (c == "&" and cur and cur[-1] in "<>"):
      segments.append("".join(cur))
      cur = []
      if text[i + 1 : i + 2] == c:  # && || ;;
        i += 1
    else:
      cur.append(c)
    i += 1
  segments.append("".join(cur))
  return [s.strip() for s in segments if s.strip()]


def shell_words(segment: str) -> list[str] | None:
  """Words of one simple command (quotes removed, ``$(...)`` kept as a variable), or None."""
  text = re.sub(r"\$\((?:[^()]|\([^()]*\))*\)", "$__SUBST__", segment)
  try:
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)
  except ValueError:
    return None


def dmad_words(segment: str) -> list[str] | None:
  """The words after ``dmad`` when ``segment`` runs ``dmad`` (after keywords and NAME=value)."""
  words = shell_words(segment)
  if not words:
    return None
  while words and (words[0] in KEYWORDS or ASSIGNMENT.match(words[0])):
    words = words[1:]
  if not words or words[0] != "dmad":
    return None
  return words[1:]


def display(segment: str) -> str:
  """A command segment without a leading ``do`` / ``then``."""
  return re.sub(r"^(?:do|then|else)\s+", "", segment.strip())


def placeholders(text: str) -> list[str]:
  """Placeholders that make a command a template (``<x>``, ``DIR``, ``L.npy``, ``...``)."""
  found = re.findall(r"<[A-Za-z_][^<>\s]*>", text)
  for word in text.split():
    word = word.strip("'\"")
    if word == "..." or word.endswith("..."):
      found.append(word)
    elif re.fullmatch(r"[A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9]+)?", word):
      found.append(word)
  return list(dict.fromkeys(found))


def cannot_run(text: str) -> str | None:
  for pattern, reason in CANNOT_RUN:
    m = re.search(pattern, text)
    if m:
      return reason.format(*m.groups())
  return None


def classify(
  source: str, line: int, text: str, rows: list[Row], *, inline: bool = False
) -> tuple[str, str]:
  """Appends the rows of one logical line; returns (kind, reason) of the line for the script
  (run: keep it; skip / template / comment: leave it out) and the listing."""
  stripped = text.strip()
  where = f"{source}:{line}"
  has_dmad = re.search(r"(?:^|[\s;&|(/'\"])dmad\s", stripped) is not None
  if stripped.startswith("#"):
    if has_dmad:
      reason = cannot_run(stripped) or "a comment in the block"
      rows.append(Row(where, line, stripped, "comment", reason))
      return "comment", reason
    return "shell", ""
  reason = cannot_run(stripped)
  if reason:
    rows.append(Row(where, line, stripped, "skip", reason))
    return "skip", reason
  commands = [(display(s), dmad_words(s)) for s in split_segments(stripped)]
  commands = [(s, w) for s, w in commands if w is not None]
  if not commands:
    return "shell", ""
  if inline and len(commands[0][1]) <= 1:
    rows.append(Row(where, line, stripped, "mention", "names a command, gives no arguments"))
    return "mention", ""
  templates = [p for s, _ in commands for p in placeholders(s)]
  if templates:
    reason = "placeholders " + ", ".join(templates)
    rows.append(Row(where, line, stripped, "template", reason))
    return "template", reason
  for segment, words in commands:
    rows.append(Row(where, line, segment, "run", words=words))
  return "run", ""


def block_unit(source: str, first: int, lines: list[str], kind: str, dedent: bool) -> Unit:
  """A unit from physical lines: rows, listing and the script (lines not run left out)."""
  rows: list[Row] = []
  listing, script = [], []
  loop_end = None
  for line, physical in logical_lines(lines, first):
    text = joined(physical)
    if not text:
      continue
    how, reason = classify(source, line, text, rows)
    listing.append((line, how, text + (f"   [{reason}]" if reason else "")))
    if how in ("run", "shell"):
      body = [p.rstrip("\n") for p in physical]
      if dedent:
        body = [body[0].strip(), *body[1:]]
      script.extend(body)
    else:
      script.append(f"# not run here ({how}): {reason}")
    # Rows inside a `for ...; do` loop (--quick shortens the list of names).
    if re.match(r"for\s+\w+\s+in\s", text) and not re.search(r"\bdone\b", text):
      loop_end = "open"
    elif loop_end == "open" and re.match(r"done\b", text):
      loop_end = None
    elif loop_end == "open":
      for row in rows:
        if row.line == line:
          row.in_loop = True
  uid = f"{source}:{first}"
  return Unit(uid, source, first, kind, listing, rows, "\n".join(script) + "\n")


def readme_units(path: Path) -> list[Unit]:
  """Fenced ```bash blocks and inline ``dmad ...`` spans of README.md, in document order."""
  source = path.relative_to(REPO).as_posix()
  lines = path.read_text().split("\n")
  units, prose = [], []
  i = 0
  while i < len(lines):
    m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
    if not m:
      prose.append(lines[i])
      i += 1
      continue
    fence, lang, start = m.group(2), m.group(3), i
    j = i + 1
    while j < len(lines) and not lines[j].strip().startswith(fence):
      j += 1
    body = lines[i + 1 : j]
    prose.extend([""] * (j - i + 1))
    if lang in ("bash", "sh", "shell", "console"):
      unit = block_unit(source, start + 2, body, "bash block", dedent=False)
      unit.uid = f"{source}:{start + 1}"
      unit.line = start + 1
      if not unit.rows:
        unit.note = "no dmad command (not run)"
        unit.rows.append(Row(unit.uid, start + 1, joined(body[:1]), "none", unit.note))
      units.append(unit)
    elif any(re.search(r"(?:^|\s)dmad\s", b) for b in body):
      row = Row(f"{source}:{start + 1}", start + 1, f"```{lang} block", "none", "not a bash block")
      units.append(Unit(row.source, source, start + 1, "fence", [], [row], note=row.reason))
    i = j + 1
  text = "\n".join(prose)
  for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
    span = " ".join(m.group(1).split())
    if not span.startswith("dmad "):
      continue
    units.append(inline_unit(source, text[: m.start()].count("\n") + 1, span))
  units.sort(key=lambda u: u.line)
  return units


def inline_unit(source: str, line: int, span: str) -> Unit:
  rows: list[Row] = []
  how, reason = classify(source, line, span, rows, inline=True)
  script = span + "\n" if how == "run" else ""
  listing = [(line, how, span + (f"   [{reason}]" if reason else ""))]
  return Unit(f"{source}:{line}", source, line, "inline span", listing, rows, script)


def docstring_units(path: Path) -> list[Unit]:
  """The indented command lines of a config's module docstring, and its ````dmad ...```` spans."""
  import ast

  source = path.relative_to(REPO).as_posix()
  tree = ast.parse(path.read_text())
  if not (tree.body and isinstance(tree.body[0], ast.Expr)):
    return []
  node = tree.body[0].value
  if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
    return []
  # The docstring's value is what it shows (``\\`` in the file is one backslash); line numbers
  # are looked up in the file, where a line continuation may have joined two value lines.
  doc_lines = node.value.split("\n")
  file_lines = path.read_text().split("\n")
  after = node.lineno

  def file_line(text: str) -> int:
    nonlocal after
    key = " ".join(text.split())[:40]
    for n in range(after, (node.end_lineno or after) + 1):
      if key in " ".join(file_lines[n - 1].split()):
        after = n + 1
        return n
    return after

  picked: list[tuple[int, list[str]]] = []
  i = 0
  while i < len(doc_lines):
    line = doc_lines[i]
    command = line.startswith("  ") and re.search(r"(?:^|\s)dmad\s", line)
    if command or (line.startswith("  ") and ASSIGNMENT.match(line.strip())):
      physical = [line]
      while physical[-1].rstrip().endswith("\\") and i + 1 < len(doc_lines):
        i += 1
        physical.append(doc_lines[i])
      picked.append((file_line(physical[0]), physical))
    i += 1
  # Assignments count only when a command follows them.
  while picked and not re.search(r"(?:^|\s)dmad\s", joined(picked[-1][1])):
    picked.pop()
  units = []
  if picked:
    rows: list[Row] = []
    script, listing = [], []
    for line, physical in picked:
      text = joined(physical)
      how, reason = classify(source, line, text, rows)
      listing.append((line, how, text + (f"   [{reason}]" if reason else "")))
      if how in ("run", "shell"):
        script.extend([physical[0].strip(), *[p.rstrip() for p in physical[1:]]])
      else:
        script.append(f"# not run here ({how}): {reason}")
    first = picked[0][0]
    script_text = "\n".join(script) + "\n"
    units.append(Unit(f"{source}:{first}", source, first, "docstring", listing, rows, script_text))
  after = node.lineno
  for m in re.finditer(r"``(dmad [^`]+)``", node.value):
    span = " ".join(m.group(1).split())
    units.append(inline_unit(source, file_line(span), span))
  return units


def extract() -> list[Unit]:
  """Every unit of README.md and configs/*.py, in the order they run."""
  units = readme_units(REPO / "README.md")
  for path in sorted((REPO / "configs").glob("*.py")):
    units.extend(docstring_units(path))
  return units


def print_listing(units: list[Unit], quick: bool) -> None:
  counts: dict[str, int] = {}
  print(f"Documented commands in README.md and configs/*.py ({REPO}):\n")
  for unit in units:
    note = f"  [{unit.note}]" if unit.note else ""
    print(f"== {unit.uid}  {unit.kind}{note}")
    for line, how, text in unit.listing:
      print(f"  {line:>4} {how:<9} {text}")
    for row in unit.rows:
      counts[row.kind] = counts.get(row.kind, 0) + 1
    if quick and quick_script(unit.script)[1]:
      print(f"       --quick: {quick_script(unit.script)[1]}")
    print()
  names = {
    "run": "to run",
    "skip": "cannot run here",
    "template": "templates",
    "comment": "in comments",
    "mention": "mentions",
    "none": "blocks without dmad",
  }
  summary = ", ".join(f"{counts[k]} {v}" for k, v in names.items() if counts.get(k))
  print(f"{len(units)} units; dmad commands: {summary}\n")


def quick_script(script: str) -> tuple[str, str]:
  """``for x in a b c; do`` lists of names (not numbers) cut to their first item."""
  notes = []

  def cut(m):
    items = m.group(3).split()
    notes.append(f"for {m.group(2)} in {' '.join(items)}: only {items[0]!r}")
    return f"{m.group(1)}{items[0]}{m.group(4)}"

  pattern = r"(?m)^(\s*for\s+(\w+)\s+in\s+)([A-Za-z_][\w-]*(?:[ \t]+[A-Za-z_][\w-]*)+)(\s*;\s*do)"
  new = re.sub(pattern, cut, script)
  return new, "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# The dmad shim.
# ---------------------------------------------------------------------------------------------
SHIM = r'''#!{python}
"""`dmad` shim of experiments/check_documented_commands.py (generated there, see its docstring):
runs the real dmad with the same arguments, stdin and output; stops `train` with SIGTERM once
its training loop runs and `eval --watch` once it has evaluated the latest checkpoint; appends
one JSON line per invocation to $DMAD_CHECK_LOG."""
import collections, fcntl, json, os, re, signal, subprocess, sys, threading, time

REAL = os.environ["DMAD_CHECK_REAL"]
LOG = os.environ["DMAD_CHECK_LOG"]
UNIT = os.environ.get("DMAD_CHECK_UNIT", "")
LIMIT = float(os.environ.get("DMAD_CHECK_TIMEOUT", "1800"))
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) \(epoch")
SAVED = re.compile(r"saved step (\d+)")


def flag(argv, name):
  for i, a in enumerate(argv):
    for p in ("--" + name, "-" + name):
      if a == p and i + 1 < len(argv):
        return argv[i + 1]
      if a.startswith(p + "="):
        return a[len(p) + 1 :]
  return None


def catches_sigterm(pid):
  """Whether the process has a SIGTERM handler (the trainer installs one around its loop)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("SigCgt:"):
          return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
  except OSError:
    pass
  return False


def latest_step(workdir):
  try:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  except OSError:
    return None
  return max(steps) if steps else None


def main():
  argv = sys.argv[1:]
  command = argv[0] if argv else ""
  watch = command == "eval" and any(
    a in ("--watch", "-watch") or a.lower() in ("--watch=true", "--watch=1") for a in argv
  )
  workdir = flag(argv, "workdir")
  t0 = time.time()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([REAL, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
  tail = collections.deque(maxlen=40)
  seen = {"step": None, "saved": None}

  def pump(src, dst):
    for raw in iter(src.readline, b""):
      dst.write(raw)
      dst.flush()
      line = raw.decode(errors="replace").rstrip()
      tail.append(line)
      if seen["step"] is None and STEP_LINE.search(line):
        seen["step"] = line
      m = SAVED.search(line)
      if m:
        seen["saved"] = int(m.group(1))

  pumps = [
    threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer), daemon=True),
    threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer), daemon=True),
  ]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    proc.send_signal(signum)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  sent = killed = None
  trigger = ""
  timed_out = False
  while proc.poll() is None:
    time.sleep(0.2)
    now = time.time()
    if not timed_out and now - t0 > LIMIT:
      timed_out, killed = True, now
      proc.terminate()
    elif timed_out and now - killed > 30:
      proc.kill()
    elif sent is None and command == "train":
      if seen["step"]:
        trigger = "it logged a training step"
      elif catches_sigterm(proc.pid):
        trigger = "its SIGTERM handler was installed"
      if trigger:
        sent = now
        proc.send_signal(signal.SIGTERM)
    elif sent is None and watch and workdir:
      step = latest_step(workdir)
      path = os.path.join(workdir, "eval", f"metrics_{step}.json")
      mtime = os.path.getmtime(path) if step is not None and os.path.isfile(path) else None
      if mtime is not None and mtime >= t0 - 1 and now - mtime > 2:
        trigger, sent = f"evaluated the latest checkpoint, step {step}", now
        proc.send_signal(signal.SIGTERM)
    elif sent is not None and watch and now - sent > 20:
      proc.kill()
  for t in pumps:
    t.join(timeout=10)
  real = proc.returncode
  if timed_out:
    rc, outcome, note = 124, "timeout", f"no exit after {LIMIT:.0f} s: stopped"
  elif command == "train" and sent and real == 143:
    rc, outcome = 0, "stopped"
    note = f"trained to step {seen['saved']}, stopped by SIGTERM (sent once {trigger})"
  elif watch and sent and real in (-signal.SIGTERM, -signal.SIGKILL, 143):
    rc, outcome, note = 0, "stopped", f"watched: {trigger}, then stopped by the shim"
  else:
    rc = real if real >= 0 else 128 - real
    outcome = "ok" if rc == 0 else "failed"
    note = "trained to the last step" if command == "train" and rc == 0 else ""
    if rc and real < 0:
      note = f"killed by signal {-real}"
  record = dict(
    unit=UNIT, argv=argv, cwd=os.getcwd(), rc=rc, real_rc=real, outcome=outcome, note=note,
    seconds=round(time.time() - t0, 1), tail=list(tail)[-15:],
  )
  with open(LOG, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(json.dumps(record) + "\n")
  sys.exit(rc)


main()
'''


def write_shim(folder: Path) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "dmad"
  path.write_text(SHIM.replace("{python}", sys.executable, 1))
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


def real_dmad() -> Path:
  override = os.environ.get("DMAD_CHECK_REAL")
  if override:
    return Path(override)
  local = REPO / ".venv" / "bin" / "dmad"
  if local.exists():
    return local
  found = shutil.which("dmad")
  if not found:
    sys.exit("no dmad executable: install the package (make test) or set DMAD_CHECK_REAL")
  return Path(found)


def dmad_python(dmad: Path) -> str:
  """The interpreter of the real dmad console script (its shebang), else this one."""
  try:
    first = dmad.read_text(errors="replace").split("\n", 1)[0]
  except OSError:
    return sys.executable
  if first.startswith("#!") and os.path.isfile(first[2:].strip().split()[0]):
    return first[2:].strip().split()[0]
  return sys.executable


# ---------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------
def load_manifest() -> list[str]:
  try:
    return json.loads(MANIFEST.read_text())["paths"]
  except (OSError, ValueError, KeyError):
    return []


def claim(paths: list[Path]) -> None:
  """Removes ``paths`` (created by an earlier run of this script) and records them as ours;
  stops if one exists that this script did not create."""
  owned = set(load_manifest())
  for path in paths:
    if (path.exists() or path.is_symlink()) and str(path) not in owned:
      sys.exit(
        f"{path} exists and was not created by this script (not in {MANIFEST}): move it away "
        "or add it to that file's 'paths' to let the script replace it"
      )
  DATA.mkdir(parents=True, exist_ok=True)
  MANIFEST.write_text(json.dumps({"paths": sorted(owned | {str(p) for p in paths})}, indent=1))
  for path in paths:
    remove(path)


def remove(path: Path) -> None:
  if path.is_symlink() or path.is_file():
    path.unlink()
  elif path.is_dir():
    shutil.rmtree(path)


def _np():
  import numpy as np

  return np


def texture(rng, h: int, w: int, channels: int, *, defect: bool = False, shift: int = 0):
  """A smooth pattern with noise; ``defect`` adds a bright square."""
  np = _np()
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  img = 120 + 50 * np.sin((x + shift) / 4.0) * np.cos(y / 5.0) + rng.normal(0, 6, (h, w))
  img = np.repeat(img[..., None], channels, axis=-1)
  if channels == 3:
    img *= np.array([1.0, 0.9, 0.8])
  if defect:
    r, c = rng.integers(4, h - 14), rng.integers(4, w - 14)
    img[r : r + 10, c : c + 10] = 250
  return np.clip(img, 0, 255).astype(np.uint8)


def save_image(path: Path, array) -> None:
  from PIL import Image

  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def make_folder_set(root: Path, seed: int, *, masks: bool, size: int = 40) -> str:
  """MVTec-style folder: 8 train/good, 3 test/good, 3 test/defect (+ ground_truth masks)."""
  np = _np()
  rng = np.random.default_rng(seed)
  for split, n in (("train/good", 8), ("test/good", 3)):
    for k in range(n):
      save_image(root / split / f"{k:03d}.png", texture(rng, size, size, 3))
  for k in range(3):
    img = texture(rng, size, size, 3)
    mask = np.zeros((size, size, 1), np.uint8)
    r, c = 6 + 8 * k, 10
    img[r : r + 9, c : c + 12] = 250
    mask[r : r + 9, c : c + 12] = 255
    save_image(root / "test" / "defect" / f"{k:03d}.png", img)
    if masks:
      save_image(root / "ground_truth" / "defect" / f"{k:03d}_mask.png", mask)
  return f"{root}: 8 train, 3 good + 3 defect test images, {size}x{size}" + (
    " with ground_truth masks" if masks else ""
  )


def make_dagm_class(root: Path, class_id: int, seed: int, size: int = 40) -> None:
  """One DAGM 2007 class in the release's layout: Class<k>/{Train,Test}/*.PNG, Label/Labels.txt
  (header line, then ``id flag image 0 mask-or-0``) and Label/<stem>_label.PNG masks; 8 Train
  images (one defective) and 6 Test images (3 defective), gray."""
  np = _np()
  rng = np.random.default_rng(seed)
  for split, n, defective in (("Train", 8, {1}), ("Test", 6, {0, 2, 4})):
    folder = root / f"Class{class_id}" / split
    lines = ["1"]
    for i in range(n):
      name = f"{i + 1:04d}.PNG"
      img = texture(rng, size, size, 1)
      mask_name = "0"
      if i in defective:
        r, c = 6 + 4 * (i % 3), 8
        img[r : r + 9, c : c + 12] = 250
        mask = np.zeros((size, size, 1), np.uint8)
        mask[r : r + 9, c : c + 12] = 255
        mask_name = name.replace(".PNG", "_label.PNG")
        save_image(folder / "Label" / mask_name, mask)
      save_image(folder / name, img)
      lines.append(f"{i + 1}\t{int(i in defective)}\t{name}\t0\t{mask_name}")
    (folder / "Label").mkdir(parents=True, exist_ok=True)
    (folder / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")


FRAMES = 12  # frames per synthetic video; the first 4 of each test video are never scored
VIDEOS = 2


def video_frames(seed: int, anomalous_from: int | None, h: int = 32, w: int = 48):
  """Gray frames of a small object walking across a textured background; from frame
  ``anomalous_from`` on a large bright block crosses the scene (the anomaly)."""
  np = _np()
  rng = np.random.default_rng(seed)
  frames = []
  for t in range(FRAMES):
    img = texture(rng, h, w, 1, shift=0)[..., 0].astype(np.int32)
    x = (3 * t + seed) % (w - 6)
    img[h // 2 : h // 2 + 8, x : x + 4] = 40
    if anomalous_from is not None and t >= anomalous_from:
      img[4:16, 2 * t : 2 * t + 12] = 255
    frames.append(np.clip(img, 0, 255).astype(np.uint8))
  return frames


def test_labels(counts: list[int]):
  """DMAD's trimmed labels: frames 4.. of every test video; the first video turns anomalous at
  frame 8, the second stays normal."""
  np = _np()
  labels = []
  for v, n in enumerate(counts):
    lab = np.zeros(n, np.int32)
    if v == 0:
      lab[8:] = 1
    labels.append(lab[4:])
  return np.concatenate(labels)


def make_ped2(raw: Path) -> list[str]:
  """$UCSD/UCSDped2/{Train,Test}/<video>/NNN.tif (+ Test001_gt masks), labels, template."""
  np = _np()
  base = raw / "UCSDped2"
  for split, prefix in (("Train", "Train"), ("Test", "Test")):
    for v in range(VIDEOS):
      anomalous = 8 if split == "Test" and v == 0 else None
      for t, frame in enumerate(video_frames(10 * v + (split == "Test"), anomalous)):
        save_image(base / split / f"{prefix}{v + 1:03d}" / f"{t + 1:03d}.tif", frame[..., None])
        if split == "Test":
          mask = np.zeros((*frame.shape, 1), np.uint8)
          if anomalous is not None and t >= anomalous:
            mask[4:16, 2 * t : 2 * t + 12] = 255
          save_image(base / split / f"{prefix}{v + 1:03d}_gt" / f"{t + 1:03d}.bmp", mask)
  np.save(DATA / "frame_labels_ped2.npy", test_labels([FRAMES] * VIDEOS))
  save_image(DATA / "bkg_ped2.jpg", texture(np.random.default_rng(5), 32, 48, 1))
  return [
    f"$UCSD={raw}: UCSDped2/Train/Train00[12], Test/Test00[12] ({FRAMES} .tif frames each), "
    "Test001_gt masks",
    f"{DATA}/frame_labels_ped2.npy ({VIDEOS * (FRAMES - 4)} labels), {DATA}/bkg_ped2.jpg",
  ]


def write_avi(path: Path, frames) -> int:
  """Writes gray frames as an MJPG .avi; returns the frame count OpenCV reads back."""
  import cv2

  path.parent.mkdir(parents=True, exist_ok=True)
  h, w = frames[0].shape
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (w, h))
  for f in frames:
    writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
  writer.release()
  capture, n = cv2.VideoCapture(str(path)), 0
  while capture.read()[0]:
    n += 1
  capture.release()
  if n == 0:
    raise RuntimeError(f"OpenCV wrote no readable frame to {path}")
  return n


def make_avenue(raw: Path) -> list[str]:
  """$AV/{training,testing}_videos/NN.avi, labels, template."""
  np = _np()
  counts = []
  for split in ("training", "testing"):
    for v in range(VIDEOS):
      anomalous = 8 if split == "testing" and v == 0 else None
      frames = video_frames(20 + 10 * v + (split == "testing"), anomalous)
      n = write_avi(raw / f"{split}_videos" / f"{v + 1:02d}.avi", frames)
      if split == "testing":
        counts.append(n)
  np.save(DATA / "frame_labels_avenue.npy", test_labels(counts))
  save_image(DATA / "bkg_avenue.jpg", texture(np.random.default_rng(6), 32, 48, 1))
  return [
    f"$AV={raw}: training_videos/0[12].avi, testing_videos/0[12].avi ({counts} frames)",
    f"{DATA}/frame_labels_avenue.npy ({sum(counts) - 4 * len(counts)} labels), "
    f"{DATA}/bkg_avenue.jpg",
  ]


SHANGHAI_TEST = ("01_0014", "02_0128")


def make_shanghai(raw: Path) -> list[str]:
  """$ST/training/videos/<scene>_<video>.avi and $ST/testing/frames/<scene>_<video>/NNN.jpg
  (every test scene has a training video), labels."""
  np = _np()
  for v, name in enumerate(("01_001", "02_001")):
    write_avi(raw / "training" / "videos" / f"{name}.avi", video_frames(40 + v, None))
  for v, name in enumerate(SHANGHAI_TEST):
    for t, frame in enumerate(video_frames(50 + v, 8 if v == 0 else None)):
      save_image(raw / "testing" / "frames" / name / f"{t:03d}.jpg", frame[..., None])
  np.save(DATA / "frame_labels_shanghai.npy", test_labels([FRAMES] * VIDEOS))
  return [
    f"$ST={raw}: training/videos/0[12]_001.avi, testing/frames/{{{','.join(SHANGHAI_TEST)}}}/ "
    f"({FRAMES} frames each)",
    f"{DATA}/frame_labels_shanghai.npy ({VIDEOS * (FRAMES - 4)} labels)",
  ]


def video_root_complete(root: Path) -> bool:
  """Whether both frames folders of a frame dump exist and hold video folders."""
  for split in ("training", "testing"):
    frames = root / split / "frames"
    if not frames.is_dir() or not any(p.is_dir() for p in frames.iterdir()):
      return False
  return True


def ensure_video_root(name: str, raw: dict[str, Path]) -> str:
  """Creates /data/<name> the way the README does, for units that use it without creating it."""
  root = DATA / name
  if name == "ped2":
    for split, src in (("training", "Train"), ("testing", "Test")):
      (root / split).mkdir(parents=True, exist_ok=True)
      (root / split / "frames").symlink_to(raw["UCSD"] / "UCSDped2" / src)
  else:
    import cv2

    videos = {
      "avenue": [
        ("training", raw["AV"] / "training_videos"),
        ("testing", raw["AV"] / "testing_videos"),
      ],
      "shanghai": [("training", raw["ST"] / "training" / "videos")],
    }[name]
    for split, folder in videos:
      for avi in sorted(folder.glob("*.avi")):
        out = root / split / "frames" / avi.stem
        out.mkdir(parents=True, exist_ok=True)
        capture, n = cv2.VideoCapture(str(avi)), 0
        while True:
          ok, frame = capture.read()
          if not ok:
            break
          cv2.imwrite(str(out / f"{n:06d}.jpg"), frame)
          n += 1
        capture.release()
    if name == "shanghai":
      (root / "testing").mkdir(parents=True, exist_ok=True)
      (root / "testing" / "frames").symlink_to(raw["ST"] / "testing" / "frames")
  return f"{root} created by this script (the unit uses it but does not create it)"


def arch_of(name: str) -> str:
  """The torchvision architecture a weights file name stands for (r18 / resnet18: IGD's)."""
  return "resnet18" if re.search(r"(?:^|[^a-z0-9])r(?:esnet)?18\b", name) else "wide_resnet50_2"


def random_teacher(path: Path, python: str, arch: str = "wide_resnet50_2") -> None:
  """torchvision's ``arch`` with random weights (the state-dict keys of the ImageNet file),
  saved with torch.save; torchvision is imported as tests/nn/resnet_convert_test.py does
  next to the CPU-only torch wheel."""
  code = textwrap.dedent(
    """
    import sys, torch
    try:
      import torchvision
    except RuntimeError as e:
      if "torchvision::nms" not in str(e):
        raise
      for m in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        del sys.modules[m]
      lib = torch.library.Library("torchvision", "DEF")
      lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, sys.argv[2])(weights=None)
    torch.save(model.state_dict(), sys.argv[1])
    """
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run([python, "-c", code, str(path), arch], check=True)


def ensure_cv2(python: str, notes: list[str]) -> None:
  """OpenCV in this interpreter (to write the .avi files) and in dmad's (extract-frames)."""
  for exe in dict.fromkeys([sys.executable, python]):
    if subprocess.run([exe, "-c", "import cv2"], capture_output=True).returncode == 0:
      continue
    print(f"installing opencv-python-headless for {exe} (cv2 is missing) ...", flush=True)
    subprocess.run([exe, "-m", "pip", "install", "-q", "opencv-python-headless"], check=True)
    notes.append(f"installed opencv-python-headless into {exe}'s environment")


# ---------------------------------------------------------------------------------------------
# What the selected units need.
# ---------------------------------------------------------------------------------------------
def run_words(unit: Unit) -> list[list[str]]:
  return [r.words for r in unit.rows if r.kind == "run" and r.words is not None]


def literal(word: str) -> bool:
  return "$" not in word and "*" not in word


def config_values(words: list[str]) -> list[str]:
  """``key=value`` values of ``--config FILE:ARG`` args."""
  out = []
  for i, w in enumerate(words):
    arg = words[i + 1] if w == "--config" and i + 1 < len(words) else None
    if w.startswith("--config="):
      arg = w.split("=", 1)[1]
    if arg and ":" in arg:
      for item in re.split(r"[;,]", arg.split(":", 1)[1]):
        if "=" in item:
          out.append(item.split("=", 1)[1])
  return out


def option(words: list[str], name: str) -> str | None:
  for i, w in enumerate(words):
    if w == name and i + 1 < len(words):
      return words[i + 1]
    if w.startswith(name + "="):
      return w.split("=", 1)[1]
  return None


def positionals(words: list[str]) -> list[str]:
  """Arguments that are not options or option values (absl: --flag VALUE or --flag=VALUE)."""
  out, skip = [], False
  valued = {"--workdir", "--out", "--step", "--config", "--scores", "--labels", "--recipe"}
  for w in words[1:]:
    if skip:
      skip = False
    elif w in valued | {"--plot", "--arch", "--poll_seconds"}:
      skip = True
    elif not w.startswith("-"):
      out.append(w)
  return out


def runs_folders(units: list[Unit]) -> set[Path]:
  """The runs/<name> folders the commands name (workdirs, --out, any runs/... word)."""
  out = set()
  for unit in units:
    for words in run_words(unit):
      for w in words:
        w = w.split("=", 1)[1] if w.startswith("--") and "=" in w else w
        m = re.match(r"(?:\./)?runs/([^/$*]+)", w)
        if m:
          out.add(REPO / "runs" / m.group(1))
  return out


def train_workdirs(unit: Unit) -> set[Path]:
  """Workdirs that the unit trains into (cleaned before it runs): runs/<name> or a run folder
  outside the repository."""
  out = set()
  for words in run_words(unit):
    workdir = option(words, "--workdir")
    if not words or words[0] != "train" or not workdir:
      continue
    m = re.match(r"(?:\./)?runs/([^/$*]+)", workdir)
    if m:
      out.add(REPO / "runs" / m.group(1))
    elif workdir.startswith("/tmp/") and literal(workdir):
      out.add(Path(workdir))
  return out


def remove_run_folder(path: Path) -> bool:
  """Removes runs/<name>, or an outside folder only when it is a dmad run directory."""
  if not path.exists():
    return False
  inside = REPO / "runs" in path.parents
  if not inside and not ((path / "config.json").exists() or (path / "checkpoints").is_dir()):
    return False
  remove(path)
  return True


def root_names(units: list[Unit]) -> set[str]:
  """Top-level entries of the repository that commands read or write (``new1.png``,
  ``weights/``, ``wrn50_2.pth``, ...): relative paths that git does not track."""
  names = set()
  for unit in units:
    for words in run_words(unit):
      for w in [
        *positionals(words),
        *config_values(words),
        *(option(words, o) for o in ("--out", "--plot", "--scores", "--labels")),
      ]:
        if not w or not literal(w) or w.startswith(("/", "-", "~")):
          continue
        first = Path(w).parts[0]
        if "/" in w or re.search(r"\.(?:png|jpe?g|npz|npy|pth|pt|safetensors|csv|json)$", w):
          if first not in ("runs", ".", ".."):
            names.add(first)
  tracked = set()
  try:
    out = subprocess.run(
      ["git", "ls-files", "-z", "--", *sorted(names)], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    tracked = {Path(p).parts[0] for p in out.split("\0") if p}
  except (OSError, subprocess.CalledProcessError):
    tracked = {n for n in names if (REPO / n).exists()}
  return names - tracked


def needs(units: list[Unit]) -> dict[str, object]:
  """What data the selected runnable units need."""
  text = "\n".join(u.script for u in units if u.runnable)
  cats = set(re.findall(r"category=(\w+)", text))
  for m in re.finditer(r"for\s+\w+\s+in\s+([^;\n]+);\s*do", text):
    if "mvtec" in text[m.end() : m.end() + 2000]:
      cats.update(m.group(1).split())
  pth, npz, images = set(), set(), set()
  for unit in units:
    for words in run_words(unit):
      if words[0] == "convert-weights":
        pos = positionals(words)
        if pos and literal(pos[0]):
          pth.add(pos[0])
      if words[0] == "predict":
        images.update(p for p in positionals(words) if literal(p))
      npz.update(v for v in config_values(words) if v.endswith(".npz") and literal(v))
  return {
    "bottle": "/data/bottle" in text,
    "dagm": sorted({int(k) for k in re.findall(r"class=(\d+)", text)})
    if "/data/dagm" in text
    else [],
    "mvtec": sorted(c for c in cats if re.fullmatch(r"[a-z_]+", c))
    if "/data/mvtec" in text
    else [],
    "ped2": "$UCSD" in text or "/data/ped2" in text,
    "avenue": "$AV" in text or "/data/avenue" in text,
    "shanghai": "$ST" in text or "/data/shanghai" in text,
    "pth": sorted(pth),
    "npz": sorted(npz),
    "images": sorted(images),
  }


def prepare(units: list[Unit], dmad: Path, notes: list[str]) -> dict[str, Path]:
  """Creates the data the selected units need; returns the raw-video folders ($UCSD, $AV, $ST)."""
  np = _np()
  need = needs(units)
  raw_root = SCRATCH / "raw"
  raw = {"UCSD": raw_root / "UCSD", "AV": raw_root / "avenue", "ST": raw_root / "shanghaitech"}
  python = dmad_python(dmad)
  ours = []
  if need["bottle"]:
    ours.append(DATA / "bottle")
  if need["mvtec"]:
    ours.append(DATA / "mvtec")
  if need["dagm"]:
    ours.append(DATA / "dagm")
  for name in ("ped2", "avenue", "shanghai"):
    if need[name]:
      ours += [DATA / name, DATA / f"frame_labels_{name}.npy"]
      ours += [DATA / f"bkg_{name}.jpg"] if name != "shanghai" else []
  if ours:
    claim(ours)
  if need["bottle"]:
    notes.append(make_folder_set(DATA / "bottle", 1, masks=False))
  for k, cat in enumerate(need["mvtec"]):
    make_folder_set(DATA / "mvtec" / cat, 100 + k, masks=True)
  if need["mvtec"]:
    notes.append(
      f"{DATA}/mvtec/{{{','.join(need['mvtec'])}}}: 8 train, 3 good + 3 defect test images "
      "(40x40) with ground_truth/defect/<stem>_mask.png"
    )
  for k in need["dagm"]:
    make_dagm_class(DATA / "dagm", k, 200 + k)
  if need["dagm"]:
    notes.append(
      f"{DATA}/dagm/Class{{{','.join(map(str, need['dagm']))}}}: 8 Train (1 defective) and 6 Test "
      "(3 defective) 40x40 gray images with Label/Labels.txt and Label/<stem>_label.PNG masks"
    )
  if need["ped2"] or need["avenue"] or need["shanghai"]:
    if raw_root.exists():
      shutil.rmtree(raw_root)
  if need["ped2"]:
    notes.extend(make_ped2(raw["UCSD"]))
  if need["avenue"] or need["shanghai"]:
    ensure_cv2(python, notes)
  if need["avenue"]:
    notes.extend(make_avenue(raw["AV"]))
  if need["shanghai"]:
    notes.extend(make_shanghai(raw["ST"]))
  for image in need["images"]:
    if not (REPO / image).exists():
      save_image(REPO / image, texture(np.random.default_rng(7), 40, 40, 3, defect=True))
      notes.append(f"{image}: a 40x40 test image for dmad predict")

  def random_weights(arch: str) -> Path:
    cache = SCRATCH / "cache" / f"{arch}_random.pth"
    if not cache.exists():
      print(f"creating {arch} with random weights (torchvision, weights=None) ...")
      random_teacher(cache, python, arch)
    return cache

  for name in need["pth"]:
    if not (REPO / name).exists():
      arch = arch_of(name)
      (REPO / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(random_weights(arch), REPO / name)
      notes.append(
        f"{name}: torchvision {arch}(weights=None), RANDOM weights with the ImageNet file's "
        "architecture and state-dict keys (the download cannot run here)"
      )
  for name in need["npz"]:
    if not (REPO / name).exists():
      arch = arch_of(name)
      subprocess.run(
        [str(dmad), "convert-weights", str(random_weights(arch)), str(REPO / name)],
        check=True,
        capture_output=True,
      )
      notes.append(f"{name}: converted from the RANDOM {arch} weights")
  return raw


# ---------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------
def run_unit(unit: Unit, env: dict, quick: bool, verbose: bool, index: str) -> None:
  script = unit.script
  if quick:
    script, note = quick_script(script)
    if note:
      unit.note = f"--quick: {note}"
      for row in unit.rows:
        if row.in_loop:
          row.note = "loop list shortened by --quick"
  safe = re.sub(r"[^\w.-]", "_", unit.uid)
  path = SCRATCH / "scripts" / f"{safe}.sh"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(f"# {unit.uid} ({unit.kind}), run by {Path(__file__).name}\n{script}")
  log = SCRATCH / "logs" / f"{safe}.log"
  log.parent.mkdir(parents=True, exist_ok=True)
  unit.log = str(log)
  print(f"[{index}] {unit.uid} ({unit.kind}) ... ", end="", flush=True)
  if verbose:
    print()
  t0 = time.time()
  with open(log, "wb") as out:
    proc = subprocess.Popen(
      ["bash", "--noprofile", "--norc", str(path)],
      cwd=REPO,
      env={**env, "DMAD_CHECK_UNIT": unit.uid},
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for chunk in iter(lambda: proc.stdout.readline(), b""):
      out.write(chunk)
      out.flush()
      if verbose:
        sys.stdout.buffer.write(b"    | " + chunk)
        sys.stdout.flush()
    proc.wait()
  unit.exit_status, unit.seconds = proc.returncode, round(time.time() - t0, 1)
  print(f"exit {unit.exit_status} in {unit.seconds:.0f} s (log: {log})", flush=True)


def word_regex(word: str) -> str:
  """A regex for the expansion of one shell word: variables and $(...) match anything."""
  parts = VARIABLE.split(word)
  return ".*".join(re.escape(p) for p in parts)


def matches(row: Row, argv: list[str]) -> bool:
  if row.words is None or len(row.words) != len(argv):
    return False
  return all(re.fullmatch(word_regex(w), a, re.S) for w, a in zip(row.words, argv, strict=True))


def read_log(path: Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assign(units: list[Unit], records: list[dict]) -> list[Row]:
  """Gives every row of a run unit its invocations and a status; returns extra rows for
  invocations no row matches and for failed units without a failed row."""
  extra = []
  by_unit: dict[str, list[dict]] = {}
  for rec in records:
    by_unit.setdefault(rec["unit"], []).append(rec)
  for unit in units:
    runnable = [r for r in unit.rows if r.kind == "run"]
    for rec in by_unit.get(unit.uid, []):
      row = next((r for r in runnable if matches(r, rec["argv"])), None)
      if row is None:
        row = Row(unit.uid, unit.line, "dmad " + shlex.join(rec["argv"]), "run")
        row.reason = "invocation that matches no documented line"
        extra.append(row)
        runnable.append(row)
      row.invocations.append(rec)
    for row in runnable:
      invs = row.invocations
      if unit.exit_status is None:
        row.status, row.note = "not run", "unit not run"
        continue
      bad = [i for i in invs if i["rc"] != 0]
      if not invs:
        row.status = "not run"
        row.note = join_notes(
          "never invoked (an && chain or a loop skipped it after an earlier failure)", row.note
        )
      elif bad:
        row.status = "timeout" if bad[0]["outcome"] == "timeout" else "FAILED"
        if any(r.status in ("FAILED", "timeout") for r in runnable[: runnable.index(row)]):
          row.note = join_notes(row.note, "after an earlier failure in this unit")
        last = next((t for t in reversed(bad[0]["tail"]) if t.strip()), "")
        row.note = join_notes(
          f"exit {bad[0]['rc']} after {bad[0]['seconds']:.0f} s: {last}", row.note
        )
      else:
        notes = list(dict.fromkeys(i["note"] or "exit 0" for i in invs))
        secs = sum(i["seconds"] for i in invs)
        times = f"ran {len(invs)}x, " if len(invs) > 1 else ""
        row.status = "ok"
        row.note = join_notes(f"{times}{'; '.join(notes)} ({secs:.0f} s)", row.note)
    if unit.exit_status and not any(r.status in ("FAILED", "timeout") for r in unit.rows):
      tail = (
        Path(unit.log).read_text(errors="replace").strip().splitlines()[-1:] if unit.log else []
      )
      row = Row(unit.uid, unit.line, f"(the {unit.kind} as a whole)", "run", status="FAILED")
      row.note = f"bash exit {unit.exit_status}: {tail[0] if tail else ''}"
      extra.append(row)
  return extra


def join_notes(*notes: str) -> str:
  return "; ".join(n for n in notes if n)


STATUS = {
  "skip": "skipped: cannot run here",
  "template": "template: not runnable as written",
  "comment": "comment: not run",
  "mention": "mention: not a command line",
  "none": "not run",
}


def table(rows: list[Row]) -> str:
  lines = ["| source | command | status | note |", "|---|---|---|---|"]
  for row in rows:
    status = row.status or STATUS.get(row.kind, "")
    note = join_notes(row.reason, row.note)
    if len(note) > 300:
      note = note[:297] + "..."
    cells = [row.source, f"`{row.text}`", status, note]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return "\n".join(lines)


def failed(row: Row) -> bool:
  return row.kind == "run" and row.status in ("FAILED", "timeout", "not run")


# ---------------------------------------------------------------------------------------------
# Self-test of the shim against a fake dmad (no JAX; a few seconds).
# ---------------------------------------------------------------------------------------------
FAKE_DMAD = r"""#!{python}
import os, signal, sys, time
argv = sys.argv[1:]
def flag(name):
  return argv[argv.index(name) + 1]
if argv[0] == "train":
  wd = flag("--workdir")
  time.sleep(0.5)  # start-up, SIGTERM not handled yet
  stop = []
  signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
  for step in range(1, 1000):
    time.sleep(0.1)
    if step % 50 == 0:
      print(f"I step {step}/999 (epoch 0.1) | loss 1.0", file=sys.stderr, flush=True)
    if stop:
      os.makedirs(os.path.join(wd, "checkpoints", str(step)), exist_ok=True)
      print(f"dmad train: stopped by SIGTERM: saved step {step} in {wd}", file=sys.stderr)
      sys.exit(143)
elif argv[0] == "eval" and "--watch" in argv:
  wd = flag("--workdir")
  step = max(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")))
  time.sleep(1)
  os.makedirs(os.path.join(wd, "eval"), exist_ok=True)
  open(os.path.join(wd, "eval", f"metrics_{step}.json"), "w").write("{}")
  while True:
    time.sleep(1)
elif argv[0] == "fail":
  print("boom", file=sys.stderr)
  sys.exit(3)
else:
  print("echo", " ".join(argv), len(sys.stdin.read()))
"""


def self_test_shim() -> int:
  folder = SCRATCH / "self_test"
  if folder.exists():
    shutil.rmtree(folder)
  fake = folder / "fake" / "dmad"
  fake.parent.mkdir(parents=True)
  fake.write_text(FAKE_DMAD.replace("{python}", sys.executable, 1))
  fake.chmod(0o755)
  shim = write_shim(folder / "bin")
  log = folder / "invocations.jsonl"
  env = dict(
    os.environ,
    PATH=f"{shim.parent}:{os.environ['PATH']}",
    DMAD_CHECK_REAL=str(fake),
    DMAD_CHECK_LOG=str(log),
    DMAD_CHECK_UNIT="self-test",
  )
  script = (
    "set -e\nW=$1/work\n"
    'dmad train --workdir "$W"\n'
    'dmad eval --workdir "$W" --watch\n'
    'printf abc | dmad echo a "b c"\n'
    "dmad fail || echo fail-status $?\n"
  )
  out = subprocess.run(
    ["bash", "-c", script, "self-test", str(folder)], env=env, capture_output=True, text=True
  )
  recs = read_log(log)
  checks = {
    "block exit 0": out.returncode == 0,
    "4 invocations logged": len(recs) == 4,
    "train stopped by SIGTERM, mapped to 0": len(recs) > 0
    and recs[0]["rc"] == 0
    and recs[0]["real_rc"] == 143
    and "trained to step" in recs[0]["note"],
    "eval --watch stopped after metrics_<step>.json": len(recs) > 1
    and recs[1]["rc"] == 0
    and recs[1]["outcome"] == "stopped",
    "stdin and stdout passed through": "echo echo a b c 3" in out.stdout,
    "exit status passed through": "fail-status 3" in out.stdout
    and len(recs) > 3
    and recs[3]["rc"] == 3,
    "output tail recorded": len(recs) > 3 and "boom" in recs[3]["tail"],
  }
  rows = [Row("self", 0, "", "run", words=["train", "--config", "configs/x.py:$ARG"])]
  checks["argv matching with $ARG"] = matches(rows[0], ["train", "--config", "configs/x.py:"])
  for name, ok in checks.items():
    print(f"  {'PASS' if ok else 'FAIL'}  {name}")
  for rec in recs:
    print(f"    {rec['argv']} -> rc {rec['rc']} ({rec['outcome']}: {rec['note']})")
  if not all(checks.values()):
    print(out.stdout, out.stderr)
  return 0 if all(checks.values()) else 1


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="loops over names run their first item")
  p.add_argument("--json", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
  p.add_argument("--list", action="store_true", help="only extract and print the commands")
  p.add_argument("--only", help="run only units whose source or text contains this")
  p.add_argument("--keep", action="store_true", help="keep runs/ folders and created files")
  p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per dmad call")
  p.add_argument("-v", "--verbose", action="store_true", help="stream the commands' output")
  p.add_argument("--self-test-shim", action="store_true", help="test the shim on a fake dmad")
  args = p.parse_args()

  if args.self_test_shim:
    return self_test_shim()
  units = extract()
  print_listing(units, args.quick)
  if args.list:
    return 0

  selected = units
  if args.only:
    selected = [
      u for u in units if args.only in u.uid or any(args.only in text for _, _, text in u.listing)
    ]
    print(f"--only {args.only!r}: {len(selected)} of {len(units)} units selected")
  todo = [u for u in selected if u.runnable]
  dmad = real_dmad()
  notes: list[str] = []
  SCRATCH.mkdir(parents=True, exist_ok=True)
  for sub in ("logs", "scripts", "bin"):
    if (SCRATCH / sub).exists():
      shutil.rmtree(SCRATCH / sub)
  shim = write_shim(SCRATCH / "bin")
  inv_log = SCRATCH / "invocations.jsonl"

  # The repository entries the commands name: runs/<name> removed, other files moved aside.
  runs = runs_folders(selected)
  names = root_names(selected)
  backup = SCRATCH / "backup"
  moved = []
  for path in sorted(runs):
    if remove_run_folder(path):
      print(f"removed {path.relative_to(REPO)} (left by an earlier run)")
  for name in sorted(names):
    if (REPO / name).exists():
      if (backup / name).exists():
        sys.exit(
          f"{backup / name} holds {name} as moved aside by a run that did not finish: put it "
          "back into the repository (or delete it) first"
        )
      backup.mkdir(parents=True, exist_ok=True)
      shutil.move(str(REPO / name), str(backup / name))
      moved.append(name)
      print(f"moved {name} aside to {backup / name} (restored at the end)")

  exit_code = 0
  try:
    try:
      raw = prepare(todo, dmad, notes) if todo else {}
    except (subprocess.CalledProcessError, OSError, RuntimeError, ImportError) as e:
      print(f"setup failed: {e}", flush=True)
      notes.append(f"SETUP FAILED, nothing was run: {e}")
      todo, raw = [], {}
    env = dict(os.environ)
    assigned = {
      m.group(1) for u in todo for m in re.finditer(r"(?:^|[;\s])([A-Za-z_]\w*)=", u.script, re.M)
    }
    for name in assigned:
      env.pop(name, None)
    env.update(
      PATH=os.pathsep.join([str(shim.parent), str(dmad.parent), env.get("PATH", "")]),
      DMAD_CHECK_REAL=str(dmad),
      DMAD_CHECK_LOG=str(inv_log),
      DMAD_CHECK_TIMEOUT=str(args.timeout),
      TPU="no-tpu-here",
      RANK="0",
      **{k: str(v) for k, v in raw.items()},
    )
    if inv_log.exists():
      inv_log.unlink()
    for n, unit in enumerate(todo, 1):
      for path in sorted(train_workdirs(unit)):
        remove_run_folder(path)
      for name, var in (("ped2", "$UCSD"), ("avenue", "$AV"), ("shanghai", "$ST")):
        root = DATA / name
        if not raw or str(root) not in unit.script:
          continue
        if var in unit.script:
          remove(root)  # the unit's own lines create it
        elif not video_root_complete(root):
          remove(root)  # missing, or left half-made by a README block that failed
          unit.note = join_notes(unit.note, ensure_video_root(name, raw))
      run_unit(unit, env, args.quick, args.verbose, f"{n}/{len(todo)}")
  finally:
    records = read_log(inv_log)
    if not args.keep:
      for path in sorted(runs | {p for u in todo for p in train_workdirs(u)}):
        remove_run_folder(path)
      for name in sorted(names):
        remove(REPO / name)
      for name in moved:
        shutil.move(str(backup / name), str(REPO / name))
    elif moved:
      print(f"--keep: the original {', '.join(moved)} are in {backup}")

  rows = [r for u in selected for r in u.rows]
  rows += assign(todo, records)
  for row in rows:
    if row.kind == "run" and not row.status:
      row.status, row.note = "not run", join_notes(row.note, "its unit did not run")
  print("\nSetup:")
  mode = "--quick: name loops cut to their first item" if args.quick else "as written"
  print(f"  - commands run {mode}; scratch (shim, scripts, logs): {SCRATCH}")
  for note in notes:
    print(f"  - {note}")
  for unit in todo:
    if unit.note:
      print(f"  - {unit.uid}: {unit.note}")
  print()
  print(table(rows))
  counts: dict[str, int] = {}
  for row in rows:
    key = row.status or STATUS.get(row.kind, row.kind)
    counts[key] = counts.get(key, 0) + 1
  print("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
  if any(failed(r) for r in rows):
    exit_code = 1
  if args.json:
    result = {
      "script": Path(__file__).resolve().relative_to(REPO).as_posix(),
      "quick": args.quick,
      "only": args.only,
      "setup": notes,
      "units": [
        {
          "source": u.uid,
          "kind": u.kind,
          "exit_status": u.exit_status,
          "seconds": u.seconds,
          "note": u.note,
        }
        for u in selected
      ],
      "rows": [
        {
          "source": r.source,
          "command": r.text,
          "kind": r.kind,
          "status": r.status or STATUS.get(r.kind, ""),
          "note": join_notes(r.reason, r.note),
          "invocations": [
            {k: i[k] for k in ("argv", "rc", "outcome", "note", "seconds", "tail")}
            for i in r.invocations
          ],
        }
        for r in rows
      ],
      "counts": counts,
      "exit_status": exit_code,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(portable(json.dumps(result, indent=1)) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")
  return exit_code


if __name__ == "__main__":
  sys.exit(main())
