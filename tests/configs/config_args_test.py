"""The config-arg syntax every file in configs/ shares (dmad_jax.configs.common) and loading a
config file by path, independent of sys.path."""

import os
import sys

import pytest

from dmad_jax import configs
from dmad_jax.configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ped2_pdm = configs.load_module(os.path.join(ROOT, "configs", "ped2_pdm.py"))
shanghai_pdm = configs.load_module(os.path.join(ROOT, "configs", "shanghai_pdm.py"))
avenue_pdm = configs.load_module(os.path.join(ROOT, "configs", "avenue_pdm.py"))


def test_both_separators_types_and_runlocal():
  a = ped2_pdm.parse_arg("root=/d;labels=/l.npy,epochs=7;runlocal")
  assert a == {"root": "/d", "labels": "/l.npy", "bkg": "median", "epochs": 7, "runlocal": True}
  assert shanghai_pdm.parse_arg("root=/d")["templates"] == "scene"


def test_commas_inside_values_stay_in_the_value():
  defaults = {"protocol": "normal=1,3", "root": None, "image_size": 256}
  a = common.parse_arg("x", "protocol=normal=0,2,4;runlocal", defaults)
  assert a["protocol"] == "normal=0,2,4" and a["runlocal"]
  a = common.parse_arg("x", "protocol=normal=0,2,root=/a,b,image_size=32,runlocal", defaults)
  assert (a["protocol"], a["root"], a["image_size"], a["runlocal"]) == (
    "normal=0,2",
    "/a,b",
    32,
    True,
  )


def test_errors_name_the_config_the_key_and_the_fix():
  with pytest.raises(
    ValueError, match=r"configs/ped2_pdm.py: unknown config arg 'rot=/d' \(did you mean 'root'\?"
  ):
    ped2_pdm.parse_arg("rot=/d")
  with pytest.raises(
    ValueError,
    match=r"avenue_pdm.py needs the config arg root=\.\.\.: pass --config configs/avenue_pdm.py:",
  ):
    avenue_pdm.parse_arg("labels=/l.npy")
  with pytest.raises(ValueError, match=r"shanghai_pdm.py: templates must be one of .*got 'video'"):
    shanghai_pdm.parse_arg("root=/d;templates=video")
  with pytest.raises(ValueError, match="heads must be one of"):
    avenue_pdm.parse_arg("root=/d;heads=paper")
  with pytest.raises(ValueError, match=r"epochs='ten' must be a int"):
    ped2_pdm.parse_arg("root=/d;epochs=ten")


def test_a_config_file_loads_without_the_repository_on_sys_path(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != ROOT])
  for name in ("folder_pdm", "mvtec_rd", "mvtec_daad"):
    sys.modules.pop("configs", None)
    path = os.path.join(ROOT, "configs", f"{name}.py")
    with pytest.raises(ValueError, match=f"configs/{name}.py needs the config arg"):
      configs.load(path, "")
  c = configs.load(os.path.join(ROOT, "configs", "folder_pdm.py"), "root=/d,image_size=32,runlocal")
  assert (c.data.root, c.model.image_size, c.model.coord_blocks) == ("/d", 32, 4)
  with pytest.raises(FileNotFoundError, match="no_such.py"):
    configs.load(tmp_path / "no_such.py")
