"""Label maps on small hand-written inputs (the real files are exercised in test_data_real)."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.labels import ludb, ptbxl, snomed


def test_parse_scp_codes_is_literal_only():
  assert ptbxl.parse_scp_codes("{'NORM': 100.0, 'SR': 0.0}") == {"NORM": 100.0, "SR": 0.0}
  assert ptbxl.parse_scp_codes("") == {}
  with pytest.raises(ValueError):
    ptbxl.parse_scp_codes("__import__('os').getcwd()")
  with pytest.raises(ValueError):
    ptbxl.parse_scp_codes("['NORM']")


def test_ptbxl_tasks_and_folds():
  statements = {
    "NORM": ptbxl.Statement("NORM", "normal", True, False, False, "NORM", "NORM"),
    "IMI": ptbxl.Statement("IMI", "inferior MI", True, False, False, "MI", "IMI"),
    "LVOLT": ptbxl.Statement("LVOLT", "low voltage", False, True, False, None, None),
    "SR": ptbxl.Statement("SR", "sinus rhythm", False, False, True, None, None),
  }
  codes = {"IMI": 50.0, "LVOLT": 0.0, "SR": 0.0, "XYZ": 100.0}
  assert ptbxl.task_labels(codes, statements, "all") == ["IMI", "LVOLT", "SR"]
  assert ptbxl.task_labels(codes, statements, "superdiagnostic") == ["MI"]
  assert ptbxl.task_labels(codes, statements, "form") == ["LVOLT"]
  assert ptbxl.task_classes(statements, "diagnostic") == ["IMI", "NORM"]
  with pytest.raises(ValueError):
    ptbxl.task_labels(codes, statements, "everything")
  np.testing.assert_array_equal(ptbxl.multi_hot(["MI", "ZZZ"], ["MI", "NORM"]), [1, 0])
  assert [ptbxl.split_of_fold(f) for f in (1, 8, 9, 10)] == ["train", "train", "val", "test"]
  with pytest.raises(ValueError):
    ptbxl.split_of_fold(11)


def test_snomed_multi_hot_and_equivalents(tmp_path):
  path = tmp_path / "dx.csv"
  path.write_text("snomed_code,dx_name,abbreviation,scored\n713427006,complete rbbb,CRBBB,1\n"
                  "59118001,rbbb,RBBB,1\n426783006,sinus rhythm,NSR,1\n55930002,st changes,STC,0\n")
  mapping = snomed.load_dx_mapping(path)
  assert snomed.scored_codes(mapping) == ["713427006", "426783006"]
  assert snomed.scored_codes(mapping, merge_equivalent=False) == ["713427006", "59118001", "426783006"]
  codes = snomed.scored_codes(mapping)
  np.testing.assert_array_equal(snomed.multi_hot("59118001, 55930002", codes), [0, 0])
  np.testing.assert_array_equal(snomed.multi_hot("59118001,55930002", codes, merge_equivalent=True), [1, 0])
  assert snomed.names(["426783006", "1"], mapping) == ["NSR", "1"]
  assert snomed.parse_dx(" 1, 2 ,,3") == ["1", "2", "3"]


def test_ludb_rows(tmp_path):
  path = tmp_path / "ludb.csv"
  path.write_text('ID,Sex,Age,Rhythms,Electric axis of the heart,Conduction abnormalities,Extrasystolies,'
                  'Hypertrophies,Cardiac pacing,Ischemia,Non-specific repolarization abnormalities,Other states\n'
                  '1,"F\n","51\n",Atrial flutter,Electric axis of the heart: left axis deviation,,,'
                  '"Left ventricular overload\nLeft atrial hypertrophy",,,,\n'
                  '2,"M\n",">89\n",Sinus rhythm,Electric axis of the heart: vertical,,,Left ventricular hypertrophy,,,,\n')
  rows = ludb.load_ludb(path)
  one, two = rows["1"], rows["2"]
  assert one.sex == "F" and one.age == 51 and two.age == 89
  assert one.hypertrophies == ("Left ventricular overload", "Left atrial hypertrophy")
  assert (ludb.af_or_flutter(one), ludb.af_or_flutter(two)) == (1, 0)
  assert (ludb.lvh(one), ludb.lvh(two)) == (0, 1)
  assert (ludb.axis_left_vs_normal(one), ludb.axis_left_vs_normal(two)) == (1, None)
  assert (ludb.sinus_rhythm(one), ludb.sinus_rhythm(two)) == (0, 1)


def test_named_tasks_are_columns_of_the_builders_labels():
  from data_pipelines.labels import tasks
  from data_pipelines.ludb import ludb_dataset_builder
  names = ludb_dataset_builder.LABEL_NAMES  # af_or_flutter, sinus_rhythm, lvh, axis_normal, axis_left_deviation
  labels = np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]], np.float32)  # 3rd: a vertical axis
  af = tasks.make_task(tasks.task_spec("ludb_af"), names, labels)
  assert af.label_names == ("af_or_flutter",) and af.labels[:, 0].tolist() == [1, 0, 0] and af.keep.all()
  axis = tasks.make_task(tasks.task_spec("ludb_axis"), names, labels)
  assert axis.labels[:, 0].tolist() == [0, 1, 0] and axis.keep.tolist() == [True, True, False]
  sex = tasks.make_task(tasks.task_spec("ludb_sex"), names, labels, {"sex": np.array([1, 0, -1])})
  assert sex.labels[:, 0].tolist() == [1, 0, 0] and sex.keep.tolist() == [True, True, False]
  # cinc:CODE+CODE: columns by SNOMED code, an equivalent code read as the code the Challenge scored it as.
  spec = tasks.task_spec("cinc:427084000+59118001")
  assert spec.columns == ("427084000", "713427006") and spec.pool_key == tasks.task_spec("cinc_stach").pool_key
  prepared = tasks.make_task(tasks.task_spec("prepared", labels=("lvh",), kind="multiclass"), names, labels)
  assert prepared.kind == "multiclass" and prepared.labels[:, 0].tolist() == [0, 1, 0]
  with pytest.raises(ValueError, match="not among the data's labels"):
    tasks.make_task(tasks.task_spec("cinc_stach"), names, labels)
  with pytest.raises(ValueError, match="unknown task"):
    tasks.task_spec("ludb_nope")
