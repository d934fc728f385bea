r"""ST-MEM pretraining. Presets: tiny, demo, cpu, small, base, large.

  # a minute on a laptop CPU, synthetic ECGs, no download (`--config pretrain:tiny` names the same file):
  stmem pretrain --config configs/pretrain.py:tiny --workdir /tmp/stmem/tiny
  # the CPU recipe: 26 minutes on 2 cores (AMD EPYC Zen 1), held-out loss from 0.99 (each patch's mean) to 0.76:
  stmem pretrain --config pretrain:cpu --workdir /tmp/stmem/cpu
  # the reference's recipe on a prepared dataset (see `stmem prepare`), 8 accelerators, FSDP over 4 of them:
  stmem pretrain --config configs/pretrain.py:base --workdir ~/runs/stmem-base \
      --config.data.source=prepared --config.data.data_dir=~/tensorflow_datasets --config.data.name=cinc \
      --config.mesh=data:2,fsdp:4
  # simulated ECGs and your own unlabeled recordings, 7 to 3 (each source reshuffled on its own epochs):
  stmem pretrain --config pretrain:tiny --workdir /tmp/stmem/mix \
      --config.data.sources=synthetic=0.7,raw:generic=0.3 --config.data.records=~/my_ecgs
  # a folder of raw WFDB records, read in memory as `stmem prepare` would prepare it (LUDB here):
  stmem pretrain --config pretrain:tiny --workdir /tmp/stmem/ludb \
      --config.data.source=raw --config.data.records=~/stmem_data/ludb --config.data.name=ludb
  # any field can be overridden: --config.optim.base_lr=3e-4 --config.total_steps=1000 --config.model.dtype=bfloat16
  # will it fit? compile ahead of time for a TPU slice or a budget (see `stmem plan --help`):
  stmem plan --config configs/pretrain.py:base --topology v5e:4x4

Running the same command again resumes from the latest checkpoint in the workdir (also after SIGTERM); on a run
already finished under the same config it says so at once.
What to expect: `tiny` and `demo` runs are too short to learn much. The loss falls from ~2.4 at initialisation to
~0.98 (predicting each patch's mean gives ~0.99) and stays near it for the first few hundred steps; `cpu` leaves it
after about 1,000 steps and keeps learning to its last (docs/study/README.md has its curve). The reference
pretrains `base` for 800 epochs at batch 2048 on 188,480 ECGs (learning rate 1.5e-4 x 2048 / 256).
"""
import ml_collections

PROGRAM = "pretrain"  # the command this file configures
PRESETS = ("tiny", "demo", "cpu", "small", "base", "large")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0                       # initialisation, data order, crops and masks all follow from it

  c.model = ml_collections.ConfigDict()
  c.model.variant = {"demo": "tiny", "cpu": "tiny"}.get(preset, preset)  # tiny, small, base or large (models/config.py)
  c.model.dtype = "float32"        # "bfloat16": bf16 computation, float32 parameters and optimiser state
  c.model.mask_ratio = 0.75        # fraction of patches masked (the reference: 0.75)
  c.model.remat = "none"           # recompute blocks in the backward pass: "none", "dots" (keep matmul outputs), "block"
  c.model.attention = "xla"        # "xla", or "cudnn" (cuDNN fused attention: NVIDIA GPUs, bfloat16)
  c.model.method = "stmem"         # "stmem", or the paper's baselines "mtae" / "mlae" (12 leads only)

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"      # "synthetic" (built-in simulator), "prepared" (a `stmem prepare` output) or "raw"
  c.data.data_dir = ""             # prepared: the --data_dir given to `stmem prepare`
  c.data.records = ""              # raw: a folder of records (or one holding ludb/, cinc2021/, ...), read in memory
  c.data.name = ""                 # prepared: dataset (folder under data_dir); raw: its builder (ludb, generic, ...)
  c.data.split = "train"           # prepared: the split to train on
  c.data.lead_set = "12"           # lead slots fed to the model, by name
  c.data.lead_map = ""             # raw: rename file channels to standard leads, e.g. ECG=I (as `stmem prepare`)
  c.data.num_synthetic = 512       # synthetic: number of 10 s records
  c.data.simulator = 2             # synthetic: simulator version (2; 1 remakes the first simulator's records exactly)
  c.data.worker_count = 0          # grain worker processes (0: in the main process)
  c.data.sources = ""              # a weighted mix, KIND[:NAME][=WEIGHT],...: e.g. synthetic=0.7,raw:generic=0.3 with
                                   # data.records=~/my_ecgs (each kind takes its keys above; "" = data.source alone)
  c.data.allow_overlap = False     # True: let evaluators score records pretraining trains on (refused otherwise)

  c.batch_size = 256               # global batch, over all processes and devices
  c.total_steps = 100_000          # optimiser steps of the whole run (the schedule ends here)
  c.warmup_steps = 4_000           # linear warm-up steps before the cosine decay

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4         # learning rate = base_lr x batch_size / 256 (the reference's rule)
  c.optim.b1 = 0.9                 # AdamW first-moment decay
  c.optim.b2 = 0.95                # AdamW second-moment decay
  c.optim.eps = 1e-8               # AdamW epsilon
  c.optim.weight_decay = 0.01      # AdamW decoupled weight decay
  c.optim.decay_mask = False       # True: no decay on biases, norms and embeddings (the reference decays all)
  c.optim.clip_norm = 0.0          # 0: no clipping
  c.optim.accum_steps = 1          # gradient accumulation: batch_size is split into this many micro-batches;
                                   # 0: the smallest count that fits memory_budget_gb (stmem.memory_plan.fit)
  c.optim.frozen = (r".*pos_embedding",)  # fixed sin-cos tables are not trained during pretraining

  c.mesh = "data:-1,fsdp:1"        # axis:size pairs; -1 takes the remaining devices
  c.num_devices = 0                # 0: every device; k: the first k (single-process runs only)
  c.fsdp_min_size = 2 ** 14        # arrays smaller than this are replicated
  c.memory_budget_gb = 0.0         # GiB one device may use; 0: the chip's memory (none on CPU: no check there)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000        # save every N steps (and at the end, and on SIGTERM)
  c.checkpoint.keep = 3            # keep the latest N checkpoints
  c.checkpoint.async_save = True   # write checkpoints in the background while training goes on

  c.log_every = 50                 # metrics (metrics.jsonl, TensorBoard, console) every N steps
  c.figure_every = 0               # reconstruction figure every N steps (0: only at the end)
  c.log_batches = False            # write the record ids of every step's batch to batches.<process>.jsonl
  # Evaluators run while pretraining trains (stmem.evaluators): NAME -> its block; `type` "heldout" or "probe"
  # (default: the name), `every` N steps and at the end; their figures go to metrics.jsonl and TensorBoard as
  # eval/NAME/... and their cost (seconds) to the log. The tiny, demo and cpu presets run both; the others none.
  c.evals = ml_collections.ConfigDict()
  c.transfer_guard = "allow"       # device-to-host reads between log/checkpoint steps: "allow", "log" or "disallow"
                                   # (the loop makes none; "disallow" turns one into an error, as the tests run)

  if preset in ("tiny", "demo", "cpu"):
    c.evals.heldout = ml_collections.ConfigDict()
    c.evals.heldout.type = "heldout"     # masked reconstruction loss on records pretraining never sees
    c.evals.heldout.every = 100          # steps between evaluations (and one at the end)
    c.evals.heldout.data = ml_collections.ConfigDict()
    c.evals.heldout.data.source = "synthetic"  # the simulator, with the seed below (not the training seed)
    c.evals.heldout.data.num_synthetic = 64    # held-out records
    c.evals.heldout.data.simulator = 2         # simulator version of the held-out records
    c.evals.heldout.seed = 10_000        # the held-out records' seed (and their crops'); masks are fixed per batch
    c.evals.heldout.batch_size = 16      # held-out records per batch
    c.evals.probe = ml_collections.ConfigDict()
    c.evals.probe.type = "probe"         # probe of the frozen encoder (the keys of configs/probe.py)
    c.evals.probe.every = 100            # steps between probes (and one at the end)
    c.evals.probe.tasks = "synthetic"    # the simulator's six classes
    c.evals.probe.data = ml_collections.ConfigDict()
    c.evals.probe.data.num_synthetic = 60  # simulated records of the probe task
    c.evals.probe.data.simulator = 2       # their simulator version
    c.evals.probe.lead_sets = "12,I"     # lead sets probed, each its own figure (eval/probe/12/auroc, ...)
    c.evals.probe.use_splits = False     # cross-validate over every record (the simulator's hash split is too small)
    c.evals.probe.cv_folds = 3           # patient-grouped folds
    c.evals.probe.l2_grid = (1e-2, 1.0, 100.0)  # L2 penalties tried per head
    c.evals.probe.lbfgs_steps = 30       # L-BFGS iterations per head
    c.evals.probe.blocks = "last"        # block specs probed (configs/probe.py); "last,mid" adds eval/probe/12/mid/...
    c.evals.probe.heads = "linear"       # "linear,mlp" adds the MLP head (eval/probe/12/mlp/auroc, ...)
    c.evals.probe.mlp_hidden = 64        # the MLP head's hidden units, smaller than stmem probe's for a CPU run
    c.evals.probe.mlp_steps = 100        # the MLP head's full-batch Adam steps
    c.evals.probe.mlp_snapshots = 4      # step counts kept for the choice on validation
    c.evals.probe.bootstrap = 100        # patient-level resamples for the intervals
    c.evals.probe.random_baseline = True  # also eval/probe/LEAD_SET/random_auroc, computed once
    c.evals.probe.seed = 20_000          # folds, bootstrap and the probe's simulated records (not pretraining's seed:
                                         # its records would be ones pretraining trains on)
  if preset == "tiny":
    c.batch_size, c.total_steps, c.warmup_steps = 16, 200, 20
    c.optim.base_lr = 1e-3 * 256 / c.batch_size   # learning rate 1e-3: short runs need a higher rate
    c.data.num_synthetic = 256
    c.checkpoint.every, c.log_every, c.figure_every = 100, 10, 0
  elif preset == "demo":
    c.batch_size, c.total_steps, c.warmup_steps = 32, 300, 30   # about 3 minutes on 2 CPU cores
    c.optim.base_lr = 1e-3 * 256 / c.batch_size
    c.data.num_synthetic = 768
    c.checkpoint.every, c.log_every, c.figure_every = 150, 20, 150
  elif preset == "cpu":
    # A budget of updates more than of examples: on 2 CPU cores the tiny model's step costs time nearly in proportion
    # to its batch, and the first hundreds of updates sit on the patch-mean plateau whatever the batch. At equal
    # time, batch 8 had left it further than batch 16 and batch 32 (docs/study/README.md, "Choosing the recipe").
    c.batch_size, c.total_steps, c.warmup_steps = 8, 6400, 200
    c.optim.base_lr = 1e-3 * 256 / c.batch_size   # learning rate 1e-3 (2e-3 left the plateau later)
    c.data.num_synthetic = 2048
    c.checkpoint.every, c.checkpoint.keep, c.log_every, c.figure_every = 800, 10, 200, 0
    c.evals.heldout.every = 800          # the study's held-out set: 256 records of seed 10,000, fixed masks
    c.evals.heldout.data.num_synthetic, c.evals.heldout.batch_size = 256, 32
    c.evals.probe.every = c.total_steps  # the simulator probe once, at the end (~22 s here)
  elif preset in ("small", "base", "large"):
    c.batch_size, c.total_steps, c.warmup_steps = 2048, 75_000, 3_750
    c.model.dtype = "bfloat16"
  else:
    raise ValueError(f"unknown preset {preset!r}: {', '.join(PRESETS)}")
  return c
