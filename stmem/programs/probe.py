"""`stmem probe`: probes of a frozen encoder on one or more tasks, swept over lead sets, blocks and heads.

  stmem probe --config configs/probe.py:shared --config.init_from=CKPT --workdir DIR   (see configs/probe.py)

The probe evaluator that pretraining runs (`stmem.evaluators.Probe`), run on a checkpoint: the same data, features,
heads and metrics, so a checkpoint probed here scores what the evaluator logged at its step. Read top to bottom:
encoders (the checkpoint and a randomly initialised twin), the probe (pools of records and tasks over them), then for
every pool and lead set one feature pass feeding every encoder and every block asked for, and for every task, block
and head a head per fold (a logistic regression with its L2 chosen on validation, or an MLP with its L2 and length
of training chosen on validation; F1 thresholds chosen on validation, the test rows scored once), then the report
with 95 % patient-level bootstrap intervals.
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

DEFAULT_CONFIG = "probe"  # configs/probe.py, found by name from any directory (stmem.configflags)


def run(config, workdir) -> dict:
  """Probe the configured encoders on every task and lead set; writes the report in `workdir`, returns a summary."""
  from stmem import console, evaluators, features, report
  from stmem import data as data_lib
  from stmem import sharding as sharding_lib
  from stmem.models import model_config
  log = console.Log("probe")
  start = time.time()
  # a data folder not downloaded yet is said before any model is built
  data_lib.check_raw_tasks([t.strip() for t in str(config.tasks).split(",") if t.strip()], config.data)

  # ------------------------------------------------------------------------------------------ mesh
  # The feature pass splits every batch over the devices of every process; the heads are fitted on the host.
  mesh = sharding_lib.mesh_from_config(config)

  # ------------------------------------------------------------------------------------------ encoders
  if config.init_from:
    main_encoder = features.load_encoder(config.init_from)
    log(f"checkpoint {config.init_from} (fingerprint {main_encoder.fingerprint}, "
        f"{main_encoder.meta.get('origin', '?')})")
    encoders = {"checkpoint": main_encoder}
  else:
    main_encoder = features.random_encoder(model_config(config.model.variant), seed=int(config.random_seed))
    log(f"no checkpoint: random-encoder rows only ({config.model.variant})")
    encoders = {}
  if config.random_baseline or not encoders:
    encoders["random init"] = features.random_encoder(main_encoder, seed=int(config.random_seed))

  # ------------------------------------------------------------------------------------------ data
  probe = evaluators.Probe(config, contract=main_encoder.contract, mesh=mesh, log=log,
                           depth=main_encoder.encoder.cfg.depth)
  notes = [f"encoder: {config.init_from or config.model.variant} (fingerprint {main_encoder.fingerprint}); "
           f"random init: same architecture, seed {config.random_seed}"]
  for pool in probe.pools.values():
    if pool.quarantine.get("total"):
      notes.append(f"{pool.name}: {pool.quarantine['total']} records skipped {pool.quarantine['by_reason']}")

  # ------------------------------------------------------------------------------------------ features and heads
  rows, curves = probe.rows(encoders)
  notes += probe.notes

  # ------------------------------------------------------------------------------------------ report
  notes += [f"{probe.title(t)}: {probe.protocols[t.name][3]}" for _, t in probe.tasks]
  notes.append(f"intervals: 95 % percentile bootstrap over patients ({config.bootstrap} resamples); F1 thresholds "
               f"chosen on validation; L2 chosen on validation {config.select_on}")
  notes += report.probe_notes(probe.blocks, probe.heads, depth=main_encoder.encoder.cfg.depth,
                              mlp={k: config.get(f"mlp_{k}") for k in ("hidden", "steps", "snapshots")})
  title = "Linear probe" if probe.heads == ["linear"] else "Frozen-encoder probe"
  paths = report.write(workdir, rows, title=title, curves=curves, notes=notes,
                       info={"config": config.to_dict(), "fingerprint": main_encoder.fingerprint,
                             "contract": main_encoder.contract.to_dict(), "seconds": round(time.time() - start, 1)})
  log.text(pathlib.Path(paths["markdown"]).read_text())
  log(f"report in {workdir} ({time.time() - start:.0f} s)")
  return {"workdir": str(workdir), "report": str(paths["markdown"]),
          "auroc": {" / ".join([r["task"], r["model"], r["lead_set"],
                                *([r["block"]] if r["block"] != evaluators.DEFAULT_BLOCK else []),
                                *([r["head"]] if r["head"] != evaluators.DEFAULT_HEAD else [])]): r["auroc"]
                    for r in rows}}


def check(config) -> None:
  """The command line's usage errors, before any encoder is built: nothing to probe, or counts of nothing."""
  from stmem import configflags
  configflags.require_items(config, "stmem probe", "tasks", "lead_sets", "blocks", "heads")
  configflags.require_positive(config, "stmem probe", "batch_size", "cv_folds", "bootstrap", zero_ok=("bootstrap",))


def main(argv: Sequence[str]) -> int:
  from stmem import entry
  return entry.main(argv, run, program="probe", config=DEFAULT_CONFIG + ":shared", check=check)
