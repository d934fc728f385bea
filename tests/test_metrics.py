"""The metric writer: metrics.jsonl and TensorBoard event files, written without importing PyTorch."""
import json
import subprocess
import sys
import textwrap

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

# tensorboardX imports torch whenever it is installed (the `torch` extra): seconds of every training run's start.
SCRIPT = textwrap.dedent("""
  import json, sys
  sys.path.insert(0, sys.argv[1])
  from stmem import metrics
  writer = metrics.MetricWriter(sys.argv[2], enabled=True)
  writer.write(3, {"loss": 0.5})
  writer.close()
  imported = "torch" in sys.modules
  try:
    import torch  # still importable afterwards, for the programs that read PyTorch checkpoints
    importable = True
  except ImportError as e:
    importable = "No module named 'torch'" in str(e)  # the extra not installed: as before
  print(json.dumps({"imported": imported, "importable": importable}))
""")


def test_the_metric_writer_does_not_import_torch(tmp_path):
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.splitlines()[-1]) == {"imported": False, "importable": True}
  assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
    {"step": 3, "loss": 0.5}]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
