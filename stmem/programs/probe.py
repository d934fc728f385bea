"""`stmem probe`: a linear probe of a frozen encoder on one or more tasks, swept over lead sets.

  stmem probe --config configs/probe.py:shared --config.init_from=CKPT --workdir DIR   (see configs/probe.py)

The probe evaluator that pretraining runs (`stmem.evaluators.Probe`), run on a checkpoint: the same data, features,
heads and metrics, so a checkpoint probed here scores what the evaluator logged at its step. Read top to bottom:
encoders (the checkpoint and a randomly initialised twin), the probe (pools of records and tasks over them), then for
every pool and lead set one feature pass feeding every encoder and for every task a logistic regression per fold (L2
chosen on validation, F1 thresholds chosen on validation, the test rows scored once), then the report with 95 %
patient-level bootstrap intervals.
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

DEFAULT_CONFIG = "probe"  # configs/probe.py, found by name from any directory (stmem.configflags)


def main(argv: Sequence[str]) -> int:
  from stmem import configflags
  config, workdir = configflags.parse(argv, "stmem probe", DEFAULT_CONFIG + ":shared")
  from stmem.metrics import console_logger
  log = console_logger("stmem.probe")
  start = time.time()

  from stmem.models import model_config
  from stmem import sharding as sharding_lib
  from stmem import evaluators, features, report
  from stmem.steps import parse_mesh

  # ------------------------------------------------------------------------------------------ mesh
  # The feature pass splits every batch over the devices of every process; the heads are fitted on the host.
  mesh = sharding_lib.make_mesh(parse_mesh(config.mesh), devices=sharding_lib.program_devices(config.num_devices))

  # ------------------------------------------------------------------------------------------ encoders
  if config.init_from:
    main_encoder = features.load_encoder(config.init_from)
    log.info("checkpoint %s (fingerprint %s, %s)", config.init_from, main_encoder.fingerprint,
             main_encoder.meta.get("origin", "?"))
    encoders = {"checkpoint": main_encoder}
  else:
    main_encoder = features.random_encoder(model_config(config.model.variant), seed=int(config.random_seed))
    log.info("no checkpoint: random-encoder rows only (%s)", config.model.variant)
    encoders = {}
  if config.random_baseline or not encoders:
    encoders["random init"] = features.random_encoder(main_encoder, seed=int(config.random_seed))

  # ------------------------------------------------------------------------------------------ data
  probe = evaluators.Probe(config, contract=main_encoder.contract, mesh=mesh, log=lambda line: log.info("%s", line))
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
  paths = report.write(workdir, rows, title="Linear probe", curves=curves, notes=notes,
                       info={"config": config.to_dict(), "fingerprint": main_encoder.fingerprint,
                             "contract": main_encoder.contract.to_dict(), "seconds": round(time.time() - start, 1)})
  print(pathlib.Path(paths["markdown"]).read_text())
  log.info("report in %s (%.0f s)", workdir, time.time() - start)
  return 0
