"""The shared config-arg parser of the video configs."""

import pytest

from configs import avenue_pdm, ped2_pdm, shanghai_pdm


def test_both_separators_types_and_runlocal():
  a = ped2_pdm.parse_arg("root=/d;labels=/l.npy,epochs=7;runlocal")
  assert a == {
    "root": "/d",
    "labels": "/l.npy",
    "bkg": "median",
    "epochs": 7,
    "runlocal": True,
  }
  assert shanghai_pdm.parse_arg("root=/d")["templates"] == "scene"


def test_errors_name_the_config_and_the_key():
  with pytest.raises(ValueError, match=r"ped2_pdm: unknown config arg 'rot=/d' \(root, labels"):
    ped2_pdm.parse_arg("rot=/d")
  with pytest.raises(ValueError, match="avenue_pdm: give the data root"):
    avenue_pdm.parse_arg("labels=/l.npy")
  with pytest.raises(ValueError, match=r"shanghai_pdm: templates must be one of .*got 'video'"):
    shanghai_pdm.parse_arg("root=/d;templates=video")
  with pytest.raises(ValueError, match="heads must be one of"):
    avenue_pdm.parse_arg("root=/d;heads=paper")
