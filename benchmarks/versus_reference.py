"""stmem beside the ST-MEM authors' PyTorch implementation on this CPU: the pretraining step and the 12-lead
embedding, same shapes, same threads, float32 and bfloat16, in one process tree.

  python -m benchmarks.versus_reference --reference_repo ../ST-MEM                  # base, batch 8, 5 runs, 2 threads
  python -m benchmarks.versus_reference --reference_repo ../ST-MEM --variant small --workloads pretrain --profile
  python -m benchmarks.versus_reference --reference_repo ../ST-MEM --dtypes float32 --lever eigen --lever onednn

What is timed, per (workload, dtype), for each implementation in its own child process:
- pretraining step: stmem's production update (`benchmarks.model_bench.pretrain_runner`, the step `stmem pretrain`
  and `stmem bench` run: its masking, forward, loss, backward and AdamW update, parameters donated) beside the
  reference's `ST_MEM` (its random masking and loss, `loss.backward()`, `torch.optim.AdamW` with the same betas 0.9 /
  0.95, eps and weight decay 0.01; sin-cos tables frozen in both);
- 12-lead embedding: stmem's pooled features (`model_bench.embed_runner`, what `stmem embed` jits) beside the
  reference's `ST_MEM_ViT.forward_encoding` under `torch.no_grad()`.
bfloat16: stmem's bf16 compute (`model.dtype="bfloat16"`: bf16 products with float32 accumulation, float32
parameters); the reference under `torch.autocast("cpu", torch.bfloat16)` (its forward and loss; backward as autocast
leaves it). Inputs: random (batch, 12, window) float32 signals (speed does not depend on the values).

Both children are set up and warmed up first (compilation, first steps), then timed in alternation, one run at a
time (A B B A A B ...), so that a change in the machine's load falls on both: the median of --repeats runs and the
process CPU time (all threads) of each run. Threads: each child is pinned to the first --threads CPUs it may use
(XLA:CPU sizes its thread pool from that), and torch.set_num_threads(--threads). Prints one JSON object with
`stmem_over_reference` (time ratios; below 1 is stmem faster) and the CPU named (model name, AVX2 / AVX-512 / BF16 /
AMX flags).

--lever NAME adds one more stmem child per XLA:CPU setting (LEVERS, or NAME='--xla_...'), timed in the same
alternation, with its time relative to stmem's and whether its compiled program differs; a lever whose child stops
(a setting that crashes XLA) is recorded and the others go on.

--profile adds, per implementation, the share of the time each class of operation takes in one profiled run
(matmuls, attention, norms and GELU, optimizer update, layout copies and converts, other): stmem's from the JAX
profiler's per-instruction events, classified by the compiled HLO; the reference's from torch.profiler's
self CPU time per aten op (benchmarks/README.md says how each class is drawn).

The reference is not part of stmem (CC BY-NC 4.0): clone it (`git clone https://github.com/bakqui/ST-MEM`) and pass
the folder; it needs torch (`pip install 'stmem[torch]'`) and einops. Without one this prints how to get it and
exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from benchmarks import machine, reference

WORKLOADS = ("pretrain", "embed")
DTYPES = ("float32", "bfloat16")
IMPLEMENTATIONS = ("reference", "stmem")
# Candidate XLA:CPU settings for stmem's side (`--lever`): each runs as one more stmem child, timed in the same
# alternation as the other two, so that one run on a CPU says which of them helps there. Whether a setting changes
# the compiled program depends on the CPU and the jaxlib build (each child reports its program's fingerprint).
LEVERS = {
  # products by XLA's own dot thunks (Eigen) instead of YNNPACK fusions
  "eigen": "--xla_cpu_experimental_ynn_fusion_type=",
  # products by oneDNN (PyTorch's CPU library) where XLA offers it for the CPU, instead of YNNPACK
  "onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot "
            "--xla_cpu_use_onednn=true",
  # elementwise work and reductions into YNNPACK fusions as well as the products
  "ynn_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
  # 512-bit vectors in the loops XLA generates itself (AVX-512 CPUs; the same HLO, other machine code)
  "vector512": "--xla_cpu_prefer_vector_width=512",
}
CLASSES = ("matmul", "attention", "norm_gelu", "optimizer", "layout", "other")
LR, B1, B2, EPS, WEIGHT_DECAY = 1e-3, 0.9, 0.95, 1e-8, 0.01  # as benchmarks/model_bench.py's step (configs/pretrain)


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.versus_reference", description=__doc__.split("\n\n")[0])
  p.add_argument("--reference_repo", default=None, help="a checkout of the ST-MEM authors' code (git clone "
                 f"{reference.URL})")
  p.add_argument("--variant", default="base", help="model variant (tiny, small, base, large)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5, help="timed runs of each after the warm-up; the median is reported")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs of each before timing")
  p.add_argument("--threads", type=int, default=2, help="CPU threads for both (pinned CPUs, torch.set_num_threads)")
  p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {WORKLOADS}")
  p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {DTYPES}")
  p.add_argument("--profile", action="store_true", help="also the per-class shares of one profiled run of each")
  p.add_argument("--lever", action="append", default=[], help="an XLA:CPU setting to time as one more stmem run "
                 f"beside the two (repeatable): a name from {sorted(LEVERS)}, or NAME='--xla_... [--xla_...]'")
  p.add_argument("--output", default=None, help="also write the JSON here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one implementation, driven by stdin
  args = p.parse_args(argv)
  args.workloads = [w for w in args.workloads.split(",") if w]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  for name, got, allowed in (("workload", args.workloads, WORKLOADS), ("dtype", args.dtypes, DTYPES)):
    bad = sorted(set(got) - set(allowed))
    if bad or not got:
      p.error(f"unknown {name}(s) {bad or got}; choose from {list(allowed)}")
  args.levers = _levers(p, args.lever)
  if min(args.batch, args.repeats, args.threads) < 1 or args.warmup < 0:
    p.error("--batch, --repeats and --threads must be at least 1, --warmup at least 0")
  return args


def _levers(p: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
  """{label: XLA flags} from the `--lever`s: a name from LEVERS, or NAME=FLAGS for any other setting."""
  out: dict[str, str] = {}
  for item in items:
    name, sep, flags = item.partition("=")
    if not sep:
      if name not in LEVERS:
        p.error(f"unknown lever {name!r}; choose from {sorted(LEVERS)} or give NAME=XLA_FLAGS")
      flags = LEVERS[name]
    if not name or not flags.split() or not all(f.startswith("--xla_") for f in flags.split()):
      p.error(f"lever {item!r}: give a name and XLA flags, NAME='--xla_... [--xla_...]'")
    if name in (*IMPLEMENTATIONS, *out):
      p.error(f"lever {name!r} is named twice or takes an implementation's name")
    out[name] = flags
  return out


# ------------------------------------------------------------------------------------------------ in a child process


def limit_threads(threads: int) -> int:
  """Pin this process to its first `threads` usable CPUs and cap OpenMP's pool, before JAX or torch is imported.
  Returns the CPUs it may use (fewer than asked when the machine has fewer)."""
  os.environ["OMP_NUM_THREADS"] = str(threads)
  try:
    cpus = sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux: leave the process as it is
    return os.cpu_count() or threads
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  return min(threads, len(cpus))


def _reference_runner(spec: dict[str, Any]):
  import numpy as np
  import torch
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  cfg = _Cfg(spec["cfg"])
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.standard_normal((spec["batch"], 12, cfg.window)).astype(np.float32))
  bf16 = spec["dtype"] == "bfloat16"

  def cast():
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

  if spec["workload"] == "pretrain":
    model = reference.pretraining_model(cfg, spec["repo"]).train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR, betas=(B1, B2), eps=EPS,
                            weight_decay=WEIGHT_DECAY)

    def one():
      opt.zero_grad(set_to_none=True)
      with cast():
        loss = model(x, mask_ratio=cfg.mask_ratio)["loss"]
      loss.backward()
      opt.step()
      return float(loss)
  else:
    model = reference.encoder(cfg, spec["repo"]).eval()

    def one():
      with torch.no_grad(), cast():
        return model.forward_encoding(x).float().sum().item()

  return one, {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _stmem_runner(spec: dict[str, Any]):
  import jax

  from benchmarks import model_bench
  make = {"pretrain": model_bench.pretrain_runner, "embed": model_bench.embed_runner}[spec["workload"]]
  one, compiled, compile_s, _ = make(spec["variant"], spec["dtype"], spec["batch"])
  return one, {"jax": jax.__version__, "compile_seconds": compile_s, "compiled": compiled}


class _Cfg:
  """The fields of stmem's ModelConfig the reference's constructors read (the child never imports stmem's models,
  which would load JAX beside torch)."""

  def __init__(self, fields: dict[str, Any]):
    self.__dict__.update(fields)
    self.window = fields["patch_size"] * fields["num_patches"]


def child(spec: dict[str, Any]) -> int:
  """One implementation of one (workload, dtype): build, warm up, print `ready`, then answer the parent's commands on
  stdin one line at a time: `run` (time one run), `profile` (per-class shares of one run), `quit`."""
  cpus = limit_threads(spec["threads"])
  if spec["impl"] == "stmem":
    from stmem import platforms
    platforms.apply()
  start = time.perf_counter()
  one, info = (_stmem_runner if spec["impl"] == "stmem" else _reference_runner)(spec)
  compiled = info.pop("compiled", None)
  if compiled is not None:
    info["program"] = program_fingerprint(compiled.as_text())
  for _ in range(spec["warmup"]):
    one()
  info.update(cpus=cpus, setup_seconds=time.perf_counter() - start)
  _say({"ready": True, **info})
  for line in sys.stdin:
    command = line.strip()
    if command == "run":
      t, c = time.perf_counter(), time.process_time()
      one()
      _say({"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c})
    elif command == "profile":
      shares = xla_profile(one, compiled) if spec["impl"] == "stmem" else torch_profile(one)
      _say({"profile": shares})
    else:
      break
  return 0


def program_fingerprint(hlo_text: str) -> str:
  """A short hash of a compiled program's instructions without their source metadata: two children whose programs
  hash alike compiled the same HLO (a lever that leaves it unchanged can only change the machine code)."""
  lines = (re.sub(r", metadata=\{[^}]*\}", "", line) for line in hlo_text.splitlines() if " = " in line)
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def _say(obj: dict[str, Any]) -> None:
  sys.stdout.write(json.dumps(obj) + "\n")
  sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ profiles


def _shares(seconds: Counter) -> dict[str, Any]:
  total = sum(seconds.values())
  return {"seconds": {k: round(seconds.get(k, 0.0), 4) for k in CLASSES}, "total_seconds": round(total, 4),
          "share": {k: round(seconds.get(k, 0.0) / total, 4) if total else 0.0 for k in CLASSES}}


# torch: self CPU time of each aten op in one run. bmm and softmax run attention (the reference's Linear layers
# multiply with addmm / mm / linear); everything under AdamW's step is the optimizer update.
_TORCH = {  # (exact names, name prefixes)
  "matmul": ({"aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::_addmm_activation"},
             ("aten::mkldnn_",)),
  "attention": ({"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax", "aten::_softmax_backward_data"},
                ("aten::_scaled_dot_product",)),
  "norm_gelu": (set(), ("aten::native_layer_norm", "aten::layer_norm", "aten::gelu")),
  "layout": ({"aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous", "aten::cat",
              "aten::stack", "aten::repeat", "aten::transpose", "aten::permute", "aten::reshape", "aten::view",
              "aten::_unsafe_view", "aten::expand", "aten::t", "aten::as_strided", "aten::_reshape_alias"}, ()),
}


def torch_class(name: str, in_optimizer: bool) -> str:
  if in_optimizer:
    return "optimizer"
  for cls, (names, prefixes) in _TORCH.items():
    if name in names or name.startswith(prefixes):
      return cls
  return "other"


def torch_profile(one) -> dict[str, Any]:
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    one()
  seconds: Counter = Counter()
  top: Counter = Counter()
  for e in prof.events():
    if not e.name.startswith("aten::"):
      continue
    parent, in_opt = e.cpu_parent, False
    while parent is not None and not in_opt:
      in_opt = parent.name.startswith("Optimizer.")
      parent = parent.cpu_parent
    s = e.self_cpu_time_total / 1e6
    seconds[torch_class(e.name, in_opt)] += s
    top[e.name] += s
  return {**_shares(seconds), "top_ops": {k: round(v, 4) for k, v in top.most_common(12)}}


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_LAYOUT_OPS = {"copy", "transpose", "convert", "bitcast", "bitcast-convert", "reshape", "broadcast", "slice",
               "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "parameter", "constant", "tuple",
               "get-tuple-element", "iota"}
_NORM_GELU_FUNCS = ("_layer_norm", "LayerNorm", "gelu", "_gelu", "Mlp.__call__")  # the MLP's elementwise work: GELU
_ATTENTION_FUNCS = ("softmax", "_softmax", "attention")


def _hlo_tables(text: str):
  """From compiled HLO text: {computation: [(name, opcode, line)]}, {instruction: (opcode, line, computation)} and
  {stack_frame_id: (file, function)} of the innermost frame."""
  files, funcs, locs, frames = {}, {}, {}, {}
  section = None
  comps: dict[str, list] = {}
  instrs: dict[str, tuple] = {}
  current = None
  for line in text.splitlines():
    head = line.strip()
    if head in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = head
      continue
    if section and re.match(r"^\d+ ", head):
      i, rest = head.split(" ", 1)
      if section == "FileNames":
        files[i] = rest.strip('"')
      elif section == "FunctionNames":
        funcs[i] = rest.strip('"')
      elif section == "FileLocations":
        m = re.search(r"file_name_id=(\d+) function_name_id=(\d+)", rest)
        locs[i] = (m.group(1), m.group(2)) if m else ("", "")
      else:
        m = re.search(r"file_location_id=(\d+)", rest)
        frames[i] = m.group(1) if m else ""
      continue
    section = None
    m = _COMP.match(line)
    if m and not line[0].isspace() and not line.startswith("HloModule"):
      current = m.group(1)
      comps[current] = []
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      comps[current].append((m.group(1), m.group(2), line))
      instrs[m.group(1)] = (m.group(2), line, current)
  frame_fn = {}
  for fid, loc in frames.items():
    file_id, fn_id = locs.get(loc, ("", ""))
    frame_fn[fid] = (files.get(file_id, ""), funcs.get(fn_id, ""))
  return comps, instrs, frame_fn


def _called(line: str) -> list[str]:
  return re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line)


def xla_class(name: str, comps, instrs, frame_fn) -> str | None:
  """The class of one instruction of the compiled program (None: a loop, call or branch, whose body's instructions
  are profiled on their own)."""
  opcode, line, _ = instrs[name]
  if opcode in ("while", "call", "conditional"):
    return None
  ops = [(opcode, line)]
  todo, seen = list(_called(line)), set()
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for _, op, l in comps[c]:
      ops.append((op, l))
      todo.extend(_called(l))
  where = [frame_fn.get(m, ("", "")) for _, l in ops for m in re.findall(r"stack_frame_id=(\d+)", l)]
  fns = {fn.split(".")[-1] for _, fn in where} | {fn for _, fn in where}
  dots = [l for op, l in ops if op in ("dot", "convolution")]
  if dots:
    batched = any(re.search(r"lhs_batch_dims=\{\d", l) for l in dots)
    return "attention" if batched or fns & set(_ATTENTION_FUNCS) and not fns & {"_matmul", "_matmul_fwd",
                                                                                "_matmul_bwd"} else "matmul"
  if any("optax" in f for f, _ in where):
    return "optimizer"
  if any(fn.startswith(_ATTENTION_FUNCS[:2]) for fn in fns) or fns & {"attention"}:
    return "attention"
  # XLA:CPU expands erf into a polynomial before fusing; the JAX name of each piece still ends in erf / erfc.
  names = {n.rsplit("/", 1)[-1] for _, l in ops for n in re.findall(r'op_name="([^"]*)"', l)}
  if (any(fn.startswith(_NORM_GELU_FUNCS) for fn in fns) or any(op in ("erf", "rsqrt") for op, _ in ops)
      or names & {"erf", "erfc", "rsqrt"}):
    return "norm_gelu"
  if all(op in _LAYOUT_OPS for op, _ in ops):
    return "layout"
  return "other"


def xla_profile(one, compiled) -> dict[str, Any]:
  """Per-class shares of one run from the JAX profiler's per-instruction events (their self time, summed over
  threads), each instruction classified by what the compiled program computes in it."""
  import glob

  import jax
  from jax.profiler import ProfileData
  comps, instrs, frame_fn = _hlo_tables(compiled.as_text())
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      one()
    data = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    events = []
    for plane in data.planes:
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):
          events.append(sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events), key=lambda t: (t[0], -t[1])))
  seconds: Counter = Counter()
  top: Counter = Counter()
  unknown = 0.0
  for line in events:
    stack: list[list] = []  # [end, name, child time]
    finished = []
    for start, duration, name in line:
      while stack and stack[-1][0] <= start:
        finished.append(stack.pop())
      if stack:
        stack[-1][2] += duration
      stack.append([start + duration, name, 0.0, duration])
    finished.extend(stack)
    for end, name, child_ns, duration in finished:
      if name not in instrs:
        if not name.startswith(("end: ", "Thunk", "Thread", "Slinky")):
          unknown += duration / 1e9
        continue
      cls = xla_class(name, comps, instrs, frame_fn)
      if cls is None:
        continue
      s = max(duration - child_ns, 0.0) / 1e9
      seconds[cls] += s
      top[f"{name} ({cls})"] += s
  return {**_shares(seconds), "top_ops": {k: round(v, 4) for k, v in top.most_common(12)},
          "unclassified_seconds": round(unknown, 4)}


# ------------------------------------------------------------------------------------------------ the parent


class ChildStopped(RuntimeError):
  def __init__(self, label: str, status: int | None, log_tail: str):
    super().__init__(f"the {label} child stopped (status {status}): {log_tail}")
    self.label, self.status = label, status
    self.last_line = (log_tail.strip().splitlines() or [""])[-1][-300:]


class _Child:
  def __init__(self, label: str, impl: str, spec: dict[str, Any], env: dict[str, str]):
    self.label, self.impl = label, impl
    # stderr to a file: the profilers write much there, and an unread pipe would block the child when it fills.
    self.log = tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.versus_reference", "--child",
                                  json.dumps({**spec, "impl": impl})],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
    self.info = self._read()

  def _read(self) -> dict[str, Any]:
    for line in self.proc.stdout:
      if line.startswith("{"):
        return json.loads(line)
    self.proc.wait()
    self.log.seek(0)
    raise ChildStopped(self.label, self.proc.returncode, self.log.read()[-3000:])

  def ask(self, command: str) -> dict[str, Any]:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
      except OSError:
        pass
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()


def _environment() -> dict[str, str]:
  """The children's environment: this one, with the huge-page allocator setting when STMEM_HUGEPAGES=1 asks for it
  (both children get it, so the comparison stays like for like)."""
  from stmem import hugepages
  return hugepages.environment() if hugepages.wanted() else os.environ.copy()


def _with_flags(env: dict[str, str], flags: str) -> dict[str, str]:
  """env with `flags` after its own XLA_FLAGS (a flag given twice: XLA takes the last)."""
  return {**env, "XLA_FLAGS": " ".join(f for f in (env.get("XLA_FLAGS", ""), flags) if f)}


def compare(args: argparse.Namespace, workload: str, dtype: str, cfg_fields: dict[str, Any]) -> dict[str, Any]:
  spec = {"workload": workload, "dtype": dtype, "variant": args.variant, "batch": args.batch,
          "threads": args.threads, "warmup": args.warmup, "repo": str(pathlib.Path(args.reference_repo).resolve()),
          "cfg": cfg_fields}
  env = _environment()
  plan = [(impl, impl, env) for impl in IMPLEMENTATIONS]
  plan += [(name, "stmem", _with_flags(env, flags)) for name, flags in args.levers.items()]
  children: list[_Child] = []
  failed: dict[str, dict[str, Any]] = {}  # levers whose child stopped: a setting that crashes XLA is a finding

  def lever_stopped(e: ChildStopped) -> None:
    if e.label in IMPLEMENTATIONS:
      raise e
    failed[e.label] = {"status": e.status, "error": e.last_line}
    print(f"{workload}/{dtype}: lever {e.label} stopped (status {e.status}): {e.last_line}", file=sys.stderr)

  def ask(c: _Child, command: str) -> dict[str, Any] | None:
    try:
      return c.ask(command)
    except ChildStopped as e:
      lever_stopped(e)
      children.remove(c)
      return None

  try:
    for label, impl, child_env in plan:  # set up one after the other: compilation and warm-up do not overlap
      try:
        children.append(_Child(label, impl, spec, child_env))
      except ChildStopped as e:
        lever_stopped(e)
    runs: dict[str, list] = {c.label: [] for c in children}
    for i in range(args.repeats):  # A B, B A, A B, ... (with levers, each round starts one further on): a drift in
      order = children[i % len(children):] + children[:i % len(children)]  # the machine's load falls on all
      for c in (order if i % 2 == 0 else order[::-1]):
        if (answer := ask(c, "run")) is not None:
          runs[c.label].append(answer)
    profiles = {c.label: answer["profile"] for c in list(children)
                if (answer := ask(c, "profile")) is not None} if args.profile else None
  finally:
    for c in children:
      c.close()
  row: dict[str, Any] = {"workload": workload, "dtype": dtype}
  for c in children:
    times = [r["seconds"] for r in runs[c.label]]
    cpu = [r["cpu_seconds"] for r in runs[c.label]]
    row[c.label] = {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu),
                    "times": [round(t, 4) for t in times], "cpu_times": [round(t, 4) for t in cpu],
                    **{k: v for k, v in c.info.items() if k != "ready"}}
    if profiles:
      row[c.label]["profile"] = profiles[c.label]
  row["stmem_over_reference"] = row["stmem"]["seconds"] / row["reference"]["seconds"]
  row["stmem_over_reference_cpu"] = row["stmem"]["cpu_seconds"] / row["reference"]["cpu_seconds"]
  if args.levers:
    row["levers"] = {name: {"xla_flags": flags, **failed[name]} if name in failed else {
      "xla_flags": flags, "same_program": row[name].get("program") == row["stmem"].get("program"),
      "over_reference": row[name]["seconds"] / row["reference"]["seconds"],
      "over_stmem": row[name]["seconds"] / row["stmem"]["seconds"]} for name, flags in args.levers.items()}
  return row


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse(argv)
  if args.child:
    return child(json.loads(args.child))
  why = reference.problem(args.reference_repo)
  if why:
    print(why, file=sys.stderr)
    return 2
  try:
    reference.modules(args.reference_repo)
  except ImportError as e:
    print(f"cannot import the reference ({e}); {reference.HOW_TO_GET}", file=sys.stderr)
    return 2
  from data_pipelines.errors import UsageError
  from stmem.models.config import model_config
  try:
    cfg = model_config(args.variant)
  except UsageError as e:
    print(e, file=sys.stderr)
    return 2
  out: dict[str, Any] = {
    "benchmark": "versus_reference",
    "command": "python -m benchmarks.versus_reference " + " ".join(argv),
    "machine": {**machine.describe(), "threads": args.threads},
    "settings": {k: getattr(args, k) for k in ("variant", "batch", "repeats", "warmup", "threads", "workloads",
                                               "dtypes", "profile", "levers")},
    "results": [],
  }
  fields = dataclasses.asdict(cfg)
  for workload in args.workloads:
    for dtype in args.dtypes:
      out["results"].append(compare(args, workload, dtype, fields))
      row = out["results"][-1]
      # Each comparison as it ends (a base run takes many minutes): on stderr, and in --output so far.
      print(f"{workload}/{dtype}: stmem {row['stmem']['seconds']:.3f} s, reference {row['reference']['seconds']:.3f} s,"
            f" stmem / reference {row['stmem_over_reference']:.3f}"
            + "".join(f"; {name} stopped (status {lever['status']})" if "error" in lever else
                      f"; {name} {row[name]['seconds']:.3f} s ({lever['over_stmem']:.3f} of stmem's"
                      + (", the same program" if lever["same_program"] else "") + ")"
                      for name, lever in row.get("levers", {}).items()), file=sys.stderr, flush=True)
      if args.output:
        pathlib.Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
  out["machine"]["loadavg_end"] = list(os.getloadavg())
  out["summary"] = {f"{r['workload']}/{r['dtype']}": {
    "reference_seconds": round(r["reference"]["seconds"], 4), "stmem_seconds": round(r["stmem"]["seconds"], 4),
    "stmem_over_reference": round(r["stmem_over_reference"], 3),
    "stmem_over_reference_cpu": round(r["stmem_over_reference_cpu"], 3),
    **{f"{name}_over_reference": round(lever["over_reference"], 3) if "error" not in lever else "stopped"
       for name, lever in r.get("levers", {}).items()}}
    for r in out["results"]}
  if args.profile:
    out["profile_share"] = {f"{r['workload']}/{r['dtype']}/{label}": r[label]["profile"]["share"]
                            for r in out["results"] for label in (*IMPLEMENTATIONS, *args.levers) if label in r}
  text = json.dumps(out, indent=2)
  print(text)
  if args.output:
    pathlib.Path(args.output).write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
