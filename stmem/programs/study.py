"""`stmem study`: does pretraining learn? ST-MEM, MTAE and MLAE pretrained alike, then probed beside random encoders.

  stmem study --config configs/study.py:cpu --workdir DIR      (see configs/study.py)

Reads top to bottom: the held-out simulator ECGs with their clean (noise-free) twins and the two reference losses
(the patch-mean baseline and the clean-signal floor), the pretraining runs (one `stmem pretrain` per method and
seed, the same budget for all), the held-out loss of every saved checkpoint, the reconstruction figures, one
`stmem probe` per checkpoint (the first seed's also scores the method's random-initialised encoder), then the
report: report.md / report.csv / report.json, loss_curves.png, reconstruction_<method>.png, auroc_<task>.png.
Like a shell script (and as `stmem demo` does) it runs the `pretrain` and `probe` commands; it imports neither
program. Run again in the same workdir (more seeds, or after a stop), it redoes nothing finished: a run with a
checkpoint at its last step is left as it is (as `stmem pretrain` would leave it), and a probe whose report has
this command's config and scored the checkpoint its run holds now is read, not run again. A run's pretraining time
is its training loop's, from its own metrics, so a run found finished keeps the time it took.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import time
from collections.abc import Sequence

import numpy as np

import configs

NAMES = {"stmem": "ST-MEM", "mtae": "MTAE", "mlae": "MLAE"}


def _csv(text) -> list[str]:
  return [t.strip() for t in str(text).split(",") if t.strip()]


def overrides(tree, prefix: str = "--config") -> list[str]:
  """A ConfigDict of overrides -> ['--config.a.b=value', ...] for another program's command line."""
  out = []
  for key, value in tree.items():
    if hasattr(value, "items"):
      out += overrides(value, f"{prefix}.{key}")
    else:
      out.append(f"{prefix}.{key}={value}")
  return out


def loop_seconds(lines: list[dict]) -> float:
  """A run's training-loop seconds from its metrics lines: the steps between two lines over the steps/s the second
  measured, summed. Start-up and compilation are left out; a segment a resumed run repeats counts once."""
  seconds, last = 0.0, 0
  for x in lines:
    if x["step"] > last and x.get("steps_per_s"):
      seconds += (x["step"] - last) / x["steps_per_s"]
    last = max(last, x["step"])
  return round(seconds, 1)


def finished_run(run_dir: pathlib.Path, args: list[str], total_steps: int) -> bool:
  """True when `run_dir` holds a finished checkpoint (its `meta` written, the rule of `stmem.checkpoint`) at
  `total_steps`: a finished run, which `stmem pretrain` leaves as is. A run there that was trained under other options
  than `stmem pretrain ARGS` gives is refused: the report would name options it did not use (and `stmem pretrain`
  would go on with the new ones)."""
  from data_pipelines.errors import UsageError
  from stmem import checkpoint as ckpt_lib
  from stmem import configflags
  from stmem import data as data_lib
  try:
    meta, _, step = ckpt_lib.read_meta(run_dir)  # its latest finished checkpoint
  except ckpt_lib.NotACheckpoint:
    return False
  config, _ = configflags.parse(args, "stmem pretrain", None)
  data_lib.record_simulator(config)  # as `stmem pretrain` records it
  differ = ckpt_lib.config_differences(meta.get("config") or {}, json.loads(config.to_json_best_effort()))
  if differ:
    shown = "; ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    raise UsageError(f"{run_dir} was pretrained under other options than this study gives ({shown}): its results "
                     f"would be reported under options it did not use; give another --workdir, or the options it used")
  return step == total_steps


def pretrain_args(config, method: str, seed: int, run_dir: pathlib.Path) -> list[str]:
  """The `stmem pretrain` command line (without the program name) of `method` and `seed` in `run_dir`."""
  return ["--config", f"{CONFIG_DIR / 'pretrain.py'}:{config.pretrain_preset}", "--workdir", str(run_dir),
          f"--config.model.method={method}", f"--config.seed={seed}",
          "--config.evals=", *overrides(config.pretrain)]  # the held-out loss of every checkpoint is scored here


@contextlib.contextmanager
def options_under(block: str):
  """A usage error from the library names the option of the program it configures (`--config.data.records`); in
  the study that option is under `block` (`--config.pretrain.data.records`)."""
  from data_pipelines.errors import UsageError
  try:
    yield
  except UsageError as e:
    raise UsageError(str(e).replace("--config.data.", f"--config.{block}.data.")) from None


def refuse_probe_overlap(config, workdir: pathlib.Path, log) -> None:
  """Recordings that pretraining would read and the probes score are refused before any run, unless
  `pretrain.data.allow_overlap` (then said). The pretraining runs score no evaluator of their own, so their own
  check has nothing to compare them with; the simulator's records are not recordings and are not compared."""
  from stmem import configflags
  from stmem import data as data_lib
  pretrain_config, _ = configflags.parse(pretrain_args(config, "stmem", 0, workdir), "stmem pretrain", None)
  with options_under("pretrain"):
    trained = data_lib.recording_pools(pretrain_config.data, seed=int(pretrain_config.seed))
  if not trained:
    return
  probe_config, _ = configflags.parse(probe_args(config, "stmem", workdir, workdir, random_baseline=False),
                                      "stmem probe", None)
  with options_under("probe"):
    pools, _ = data_lib.task_pools(_csv(probe_config.tasks), trained[0].contract, probe_config.data,
                                   labels=_csv(probe_config.labels), kind=probe_config.kind,
                                   seed=int(probe_config.seed))
  data_lib.refuse_shared(trained, [(f"the probe's {key} task", pool) for key, pool in pools.items()],
                         allow=bool(pretrain_config.data.allow_overlap),
                         flag="--config.pretrain.data.allow_overlap", log=log)


def probe_args(config, method: str, run_dir: pathlib.Path, probe_dir: pathlib.Path, *, random_baseline: bool):
  """The `stmem probe` command line (without the program name) that scores `run_dir`'s checkpoint in `probe_dir`."""
  lead_sets = config.probe.lead_sets if method == "stmem" else "12"  # MTAE / MLAE refuse other lead sets
  probe_config = {k: v for k, v in config.probe.items() if k != "preset"}
  return ["--config", f"{CONFIG_DIR / 'probe.py'}:{config.probe.preset}", "--workdir", str(probe_dir),
          f"--config.init_from={run_dir}", f"--config.random_baseline={random_baseline}",
          *overrides({**probe_config, "lead_sets": lead_sets})]


def finished_probe(args: list[str], probe_dir: pathlib.Path, run_dir: pathlib.Path) -> dict | None:
  """The report.json already in `probe_dir` when `stmem probe ARGS` would only repeat it: the config it recorded
  is the one ARGS parse to, and the encoder it scored is the checkpoint `run_dir` holds now (same fingerprint).
  None otherwise, or when there is none."""
  path = probe_dir / "report.json"
  if not path.exists():
    return None
  from stmem import configflags, features
  try:
    done = json.loads(path.read_text())
  except (OSError, ValueError):
    return None  # a report cut short: run the probe again
  config, _ = configflags.parse(args, "stmem probe", None)
  same_config = json.loads(json.dumps(config.to_dict(), default=str)) == done.get("info", {}).get("config")
  if not same_config:
    return None
  return done if done["info"].get("fingerprint") == features.load_encoder(str(run_dir)).fingerprint else None


# ------------------------------------------------------------------------------------------------ held-out ECGs


def heldout(config):
  """The held-out evaluator (`stmem.evaluators.HeldOut`) of `config.heldout`, on this process's first device (where
  checkpoints load), and the clean twin of each of its batches' signal: the same records without their noise,
  through the same pipeline (offline band-pass, the same crops: a crop is a function of seed and index)."""
  import dataclasses

  import jax

  from data_pipelines.contract import Contract
  from stmem import data, evaluators, sharding
  contract = Contract(filter_stage="offline")
  mesh = sharding.make_mesh([("data", 1)], devices=jax.local_devices()[:1])
  evaluator = evaluators.HeldOut(config.heldout, contract=contract, mesh=mesh)
  clean_pool = data.open_pool(dataclasses.replace(evaluator.spec, options=(("signal", "clean"),)), contract)
  clean = [b["signal"] for b in evaluators.heldout_batches(clean_pool, batch_size=evaluator.batch_size,
                                                           seed=evaluator.seed, lead_set="12",
                                                           num_batches=len(evaluator.batches))]
  return evaluator, clean


def reference_losses(method: str, noisy: Sequence[dict], clean: Sequence[np.ndarray], patch_size: int = 75) -> dict:
  """The held-out loss of two fixed predictors, in `method`'s norm-pix units (its own token size):

  patch_mean: predicting each target token's mean (zero after normalisation): (n - 1) / n for n values per token;
  clean_floor: predicting the noise-free token, normalised the same way. Noise becomes unit-variance target in
  flat tokens, so no model can be expected to go below about this (a model could in principle shrink towards the
  conditional mean and beat it a little; it is the floor a reconstruction loss is read against)."""
  import jax.numpy as jnp

  from stmem.models import baselines, model_config
  from stmem.models.stmem import patch_targets
  cfg = model_config("tiny", method=method, patch_size=patch_size)

  def tokens(signal):
    x = jnp.asarray(signal)
    if method == "stmem":
      return x.reshape(*x.shape[:2], -1, patch_size)
    return baselines.tokenize(x, cfg)

  floor, mean = [], []
  for b, c in zip(noisy, clean):
    target = patch_targets(tokens(b["signal"]), True)
    floor.append(float(((target - patch_targets(tokens(c), True)) ** 2).mean()))
    mean.append(float((target ** 2).mean()))
  return {"patch_mean": float(np.mean(mean)), "clean_floor": float(np.mean(floor))}


def heldout_loss(checkpoint: pathlib.Path, evaluator) -> tuple[float, tuple]:
  """The held-out evaluator's loss of a checkpoint (the same ECGs and, within a method, the same masks for every
  checkpoint of every run). Returns (loss, (forward, state)), the jitted forward pass for figures."""
  from flax import nnx

  from stmem import checkpoint as ckpt_lib, evaluators
  model, _ = ckpt_lib.load_model(checkpoint)
  graphdef, state = nnx.split(model)
  loss = evaluator.run(evaluators.Model(graphdef, state, model.cfg))["loss"]
  return loss, (evaluator.forward(graphdef), state)


def reconstruction_figure(method: str, forward, batch: dict, path: pathlib.Path, loss: float) -> str:
  """The first held-out ECG: its patches, the masked ones shaded, the model's reconstruction over them."""
  from data_pipelines import leads as leads_lib
  from stmem import plots
  fn, state = forward
  out = fn(state, batch["signal"][:1], batch["lead_ids"][:1], batch["lead_mask"][:1], 0)  # batch 0's mask
  patches = np.asarray(batch["signal"][0]).reshape(batch["signal"].shape[1], -1, 75)
  mean, std = patches.mean(-1, keepdims=True), np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
  pred = np.asarray(out["pred"][0]) * std + mean   # `pred` is in per-patch units for every method
  mask = np.asarray(out["mask"][0])
  names = [leads_lib.LEADS[i] for i in np.asarray(batch["lead_ids"][0])]
  return plots.plot_reconstruction(patches, pred, mask, path, lead_names=names,
                                   title=f"{NAMES[method]}: held-out reconstruction (batch loss {loss:.3f})")


def loss_figure(curves: dict, refs: dict, path: pathlib.Path) -> str:
  """Training loss (lines) and held-out loss (markers) of every run, with each method's two reference losses."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = {"stmem": "C0", "mtae": "C1", "mlae": "C2"}
  fig, ax = plt.subplots(figsize=(9, 5))
  for (method, seed), c in curves.items():
    label = f"{NAMES[method]} seed {seed}"
    ax.plot(c["train_step"], c["train_loss"], color=colors[method], alpha=0.35, linewidth=1)
    ax.plot(c["heldout_step"], c["heldout_loss"], "o-", color=colors[method], ms=4, label=f"{label} (held-out)")
  for method, r in refs.items():
    ax.axhline(r["patch_mean"], color=colors[method], linestyle=":", linewidth=1)
    ax.axhline(r["clean_floor"], color=colors[method], linestyle="--", linewidth=1,
               label=f"{NAMES[method]} clean-signal floor {r['clean_floor']:.3f}")
  ax.set_xlabel("pretraining step")
  ax.set_ylabel("masked reconstruction loss (norm-pix)")
  ax.set_title("training (faint lines) and held-out (markers) loss; dotted: patch-mean, dashed: clean floor",
               fontsize=10)
  ax.grid(color="#eeeeee")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return str(path)


# ------------------------------------------------------------------------------------------------ the program


def aggregate(rows: Sequence[dict]) -> list[dict]:
  """Per (task, model, lead set, block, head): the mean over seeds of every metric and of its interval ends, and
  the seeds' spread (min, max) of the AUROC."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["task"], r["model"], r["lead_set"], r.get("block"), r.get("head")), []).append(r)
  out = []
  for rs in groups.values():
    row = {k: v for k, v in rs[0].items() if not isinstance(v, float)}
    for k in rs[0]:
      if isinstance(rs[0][k], float):
        row[k] = float(np.mean([r[k] for r in rs]))
    aurocs = [r["auroc"] for r in rs]
    row.update(seeds=len(rs), auroc_seed_min=float(min(aurocs)), auroc_seed_max=float(max(aurocs)))
    out.append(row)
  return out


CONFIG_DIR = pathlib.Path(configs.__file__).parent


def run(config, workdir) -> dict:
  """The study `config` (configs/study.py) in `workdir`; returns a summary (the report's paths, the final losses)."""
  from stmem import console, entry, programs
  from stmem.models import METHODS
  from stmem import report
  log = console.Log("study")
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  methods, seeds = _csv(config.methods), [int(s) for s in _csv(config.seeds)]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods or not seeds:
    from data_pipelines.errors import UsageError
    raise UsageError(f"--config.methods must name some of {list(METHODS)} (got {config.methods!r}) "
                     f"and --config.seeds at least one seed (got {config.seeds!r})")

  # the probes' records, checked now rather than after the pretraining runs
  from stmem import data as data_lib
  with options_under("probe"):
    data_lib.check_raw_tasks(_csv(config.probe.get("tasks", "")), config.probe.get("data") or {})
  refuse_probe_overlap(config, workdir, log)
  # runs already in the workdir: finished ones are kept, and one trained under other options is refused, before
  # anything is computed
  run_dirs = {(method, seed): workdir / "runs" / f"{method}_seed{seed}" for method in methods for seed in seeds}
  finished = {(method, seed): finished_run(run_dir, pretrain_args(config, method, seed, run_dir),
                                           int(config.pretrain.total_steps))
              for (method, seed), run_dir in run_dirs.items()}

  # ------------------------------------------------------------------------------------------ held-out ECGs
  evaluator, clean = heldout(config)
  noisy = evaluator.batches
  refs = {m: reference_losses(m, noisy, clean) for m in methods}
  for m, r in refs.items():
    log(f"{NAMES[m]} held-out references: patch-mean {r['patch_mean']:.4f}, clean-signal floor "
        f"{r['clean_floor']:.4f}")

  # ------------------------------------------------------------------------------------------ pretraining
  timings = {}
  for (method, seed), run_dir in run_dirs.items():
    t0 = time.time()
    if finished[method, seed]:
      # what `stmem pretrain` would do with it, without the minute it takes to start and build its data
      log(f"{NAMES[method]} seed {seed}: {run_dir} is at step {config.pretrain.total_steps}, finished; left as it is")
    else:
      rc = programs.run(["pretrain", *pretrain_args(config, method, seed, run_dir)])
      if rc:
        log(f"`stmem pretrain` for {method} seed {seed} failed; see {run_dir}")
        raise entry.CommandFailed("pretrain", rc)
    timings[f"pretrain {method} seed {seed}"] = round(time.time() - t0, 1)  # this command's, 0-ish when finished

  # ------------------------------------------------------------------------------------------ held-out loss
  from stmem import checkpoint as ckpt_lib
  curves, finals = {}, []
  for (method, seed), run_dir in run_dirs.items():
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lines = [x for x in lines if "loss" in x]  # the training metrics (evaluators write lines of their own)
    directory, _ = ckpt_lib.resolve(run_dir)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    held = []
    for s in steps:
      loss, forward = heldout_loss(directory / str(s), evaluator)
      held.append(loss)
    curves[method, seed] = {"train_step": [x["step"] for x in lines], "train_loss": [x["loss"] for x in lines],
                            "heldout_step": steps, "heldout_loss": held}
    finals.append({"method": method, "seed": seed, "steps": steps[-1], "heldout_loss": held[-1],
                   "train_loss": lines[-1]["loss"], **refs[method],
                   "gap_to_floor": held[-1] - refs[method]["clean_floor"], "seconds": loop_seconds(lines)})
    log(f"{NAMES[method]} seed {seed}: held-out loss {' '.join(f'{s}:{x:.3f}' for s, x in zip(steps, held))} "
        f"(patch-mean {refs[method]['patch_mean']:.3f}, floor {refs[method]['clean_floor']:.3f})")
    if seed == seeds[0]:
      reconstruction_figure(method, forward, noisy[0], workdir / f"reconstruction_{method}.png", held[-1])
  loss_figure(curves, refs, workdir / "loss_curves.png")

  # ------------------------------------------------------------------------------------------ probes
  probe_rows = []
  for (method, seed), run_dir in run_dirs.items():
    probe_dir = workdir / "probes" / f"{method}_seed{seed}"
    args = probe_args(config, method, run_dir, probe_dir, random_baseline=seed == seeds[0])
    t0 = time.time()
    done = finished_probe(args, probe_dir, run_dir)
    if done:
      log(f"{NAMES[method]} seed {seed}: the probe in {probe_dir} has this config and this checkpoint; read, not rerun")
      timings[f"probe {method} seed {seed}"] = done["info"].get("seconds")
    else:
      rc = programs.run(["probe", *args])
      if rc:
        log(f"`stmem probe` of {method} seed {seed} failed; see {probe_dir}")
        raise entry.CommandFailed("probe", rc)
      timings[f"probe {method} seed {seed}"] = round(time.time() - t0, 1)
    for row in json.loads((probe_dir / "report.json").read_text())["rows"]:
      random = row["model"] != "checkpoint"
      row = {k: (float("nan") if v is None else v) for k, v in row.items()}
      row.update(model=f"random {NAMES[method]}" if random else NAMES[method], seed=seed, method=method)
      probe_rows.append(row)

  # ------------------------------------------------------------------------------------------ report
  summary = aggregate(probe_rows)
  not_probed = [m for m in methods if m != "stmem"]
  notes = [
    f"pretraining: configs/pretrain.py:{config.pretrain_preset} with {' '.join(overrides(config.pretrain))}, "
    f"the same for every method; seeds {seeds}",
    f"held-out: {config.heldout.data.num_synthetic} simulator records (seed {config.heldout.seed}), fixed masking keys",
    "probe rows: mean over seeds of each metric and of its 95 % patient-bootstrap interval ends; "
    "`auroc_seed_min`/`auroc_seed_max` in report.csv/json give the seeds' spread",
    *([f"{', '.join(NAMES[m] for m in not_probed)}: probed on lead set 12 only (their tokens need all 12 leads)"]
      if not_probed else []),
  ]
  lines = ["## Held-out reconstruction loss (simulator ECGs)", "",
           "| method | seed | steps | held-out loss | patch-mean baseline | clean-signal floor | gap to floor | "
           "training loop s |", "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {NAMES[f['method']]} | {f['seed']} | {f['steps']} | {f['heldout_loss']:.4f} | {f['patch_mean']:.4f} | "
            f"{f['clean_floor']:.4f} | {f['gap_to_floor']:.4f} | {f['seconds']:.0f} |" for f in finals]
  paths = report.write(workdir, summary, title="Does pretraining learn? (pretrain-then-probe study)", notes=notes,
                       info={"config": config.to_dict(), "pretraining": finals, "per_seed_rows": probe_rows,
                             "seconds": round(time.time() - start, 1), "timings": timings})
  md = pathlib.Path(paths["markdown"])
  md.write_text(md.read_text() + "\n" + "\n".join(lines) + "\n")
  log.text(md.read_text())
  log(f"study in {workdir} ({time.time() - start:.0f} s)")
  return {"workdir": str(workdir), "report": str(md),
          "heldout_loss": {f"{f['method']} seed {f['seed']}": f["heldout_loss"] for f in finals}}


def check(config) -> None:
  """The command line's usage errors, before any pretraining: empty lists and counts that would run nothing."""
  from stmem import configflags
  configflags.require_items(config, "stmem study", "methods", "seeds", "probe.tasks", "probe.lead_sets")
  configflags.require_positive(config, "stmem study", "pretrain.total_steps", "pretrain.batch_size",
                               "pretrain.checkpoint.every", "heldout.batch_size")


def main(argv: Sequence[str]) -> int:
  from stmem import entry
  return entry.main(argv, run, program="study", config=f"{CONFIG_DIR / 'study.py'}:cpu", check=check)
