"""The probe harness on the shared real data: LUDB AF/flutter, LVH, electric axis (left vs normal) and CinC sinus
tachycardia, read raw, 5-fold patient-grouped cross-validation, bootstrap intervals, random-encoder rows; and a
lead set in an order the checkpoint never saw, fed by name. (On the same shared data: fine-tuning in
tests/test_downstream_prepared.py, the embedding round trip in tests/test_embed.py.)

The encoder is a tiny randomly initialised one: the point is the harness, not the numbers.
"""
import json

import numpy as np

from tests.helpers import tiny_checkpoint


def test_probe_on_shared_data(shared_data, tmp_path):
  from stmem.programs import probe
  ckpt = tiny_checkpoint(tmp_path / "ckpt")
  out = tmp_path / "report"
  rc = probe.main([f"--config={probe.DEFAULT_CONFIG}:test", f"--config.init_from={ckpt}",
                   f"--config.data.records={shared_data}", "--config.tasks=ludb_af,ludb_lvh,ludb_axis,cinc_stach",
                   "--workdir", str(out)])
  assert rc == 0
  rows = json.loads((out / "report.json").read_text())["rows"]
  by = {(r["task"], r["model"], r["lead_set"]): r for r in rows}
  for task, n, pos in (("ludb_af", 200, 18), ("ludb_lvh", 200, 108), ("ludb_axis", 141, 66), ("cinc_stach", 50, 23)):
    for model in ("checkpoint", "random init"):
      for lead_set in ("12", "I"):
        r = by[(task, model, lead_set)]
        assert r["n_records"] == n and r["n_positive"] == pos
        assert r["protocol"] == "5-fold patient-grouped cross-validation"
        assert r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"] and r["auroc_hi"] - r["auroc_lo"] > 0.02
        assert 0 <= r["f1"] <= 1 and np.isfinite(r["auprc"])
  # AF/flutter has an irregular rhythm that even random features pick up a little.
  assert by[("ludb_af", "checkpoint", "12")]["auroc"] > 0.6
  md = (out / "report.md").read_text()
  assert "random init" in md and "AUROC [95 % CI]" in md
  for name in ("auroc_ludb_af.png", "roc_cinc_stach.png", "report.csv"):
    assert (out / name).stat().st_size > 0


def test_a_lead_set_in_an_order_the_checkpoint_never_saw_is_fed_by_name(shared_data, tmp_path):
  # Real CinC records: V5+aVL+II gives the features of II+aVL+V5 (each slot carries its lead's identity), and
  # differs from another three leads.
  from stmem import data
  from stmem import features, sharding
  loaded = features.load_encoder(tiny_checkpoint(tmp_path / "ckpt"))
  mesh = sharding.make_mesh([("data", -1)])
  pool = data.open_pool(data.DatasetSpec("raw", path=str(shared_data / "cinc2021"), name="cinc"), loaded.contract)
  assert len(pool.record_id) == 50
  got = {s: features.extract({"m": loaded}, pool.source, pool.contract, lead_set=s, batch_size=16,
                                mesh=mesh)
         for s in ("V5+aVL+II", "II+aVL+V5", "II+aVL+V4")}
  np.testing.assert_allclose(got["V5+aVL+II"]["features"]["m"], got["II+aVL+V5"]["features"]["m"], atol=2e-5)
  assert np.abs(got["V5+aVL+II"]["features"]["m"] - got["II+aVL+V4"]["features"]["m"]).max() > 1e-3
  assert list(got["V5+aVL+II"]["record_id"]) == list(pool.record_id)
