"""The Markdown model card written beside every exported encoder.

Pure text from what the checkpoint records (model config, contract, origin, training config and step) and what the
export computed (parameter count, fingerprint, weights file and its hash). Nothing is invented: a field the checkpoint
does not record says so. The license is left for the owner of the weights to fill in.
"""
from __future__ import annotations

import json
from typing import Any

from stmem.checkpoint import FINGERPRINT_DEFINITION
from stmem.models.config import VARIANTS

_ENCODER_FIELDS = ("width", "depth", "num_heads", "mlp_ratio", "patch_size", "num_patches", "num_lead_ids")

LICENSE_PLACEHOLDER = "TO BE FILLED IN BY THE OWNER OF THESE WEIGHTS"


def variant_name(model: dict[str, Any]) -> str | None:
  """The named variant whose encoder matches this config, if any."""
  for name, cfg in VARIANTS.items():
    if all(model.get(f) == getattr(cfg, f) for f in _ENCODER_FIELDS):
      return name
  return None


def _training_lines(meta: dict[str, Any]) -> list[str]:
  origin = str(meta.get("origin", "not recorded"))
  config = meta.get("config") or {}
  lines = [f"- Origin: `{origin}`", f"- Checkpoint step: {meta.get('step', 'not recorded')}"]
  if origin.startswith("reference:"):
    lines.append("- Converted from the ST-MEM authors' published weights. Their file records no training data or "
                 "steps; the paper reports pretraining on Chapman, Ningbo and CODE-15 (188,480 ten-second 12-lead "
                 "ECGs, 800 epochs). Check the authors' release for what these particular weights are.")
  data = config.get("data") if isinstance(config, dict) else None
  if data:
    lines.append("- Training data (as recorded in the checkpoint's config):")
    lines += [f"  - `{k}`: `{json.dumps(v)}`" for k, v in sorted(data.items()) if v not in ("", None)]
  elif not origin.startswith("reference:"):
    lines.append("- Training data: not recorded in the checkpoint")
  steps = {k: config[k] for k in ("steps", "total_steps", "num_steps", "epochs") if isinstance(config, dict) and k in config}
  if steps:
    lines.append("- Planned training length (config): " + ", ".join(f"{k} = {v}" for k, v in steps.items()))
  for key in ("seed", "batch_size", "learning_rate", "lr"):
    if isinstance(config, dict) and key in config:
      lines.append(f"- `{key}`: `{json.dumps(config[key])}`")
  return lines


def _evaluation_lines(evaluations: dict[str, float]) -> list[str]:
  """The evaluators' figures pretraining logged (`eval/NAME/...`), as a table; what the run did not measure is
  said, not guessed."""
  if not evaluations:
    return ["Not recorded: the run logged no evaluator figures for this step (pretraining's `evals` blocks, or "
            "`stmem probe` on these weights, measure them)."]
  step = evaluations.get("step")
  rows = sorted((k, v) for k, v in evaluations.items() if k != "step" and not k.endswith("/seconds"))
  lines = [f"Logged by the pretraining run's evaluators at step {step} (`eval/NAME/...` in its metrics.jsonl; "
           "`probe` rows are macro AUROC with their bootstrap interval ends `_lo` / `_hi`, `heldout` the masked "
           "reconstruction loss on records the run never trained on):", "", "| figure | value |", "|---|---|"]
  lines += [f"| `{k.removeprefix('eval/')}` | {v:.4g} |" for k, v in rows]
  return lines


def _front_matter(variant: str | None) -> list[str]:
  """The metadata block a model hub reads from the top of README.md (its card): library, tags, no licence claimed."""
  tags = ["ecg", "electrocardiogram", "self-supervised", "masked-autoencoder", "st-mem", "feature-extraction"]
  return ["---", "library_name: stmem", "pipeline_tag: feature-extraction", "tags:",
          *[f"- {t}" for t in tags + ([f"st-mem-{variant}"] if variant else [])],
          "license: other  # the weights' owner states it under License below", "---", ""]


def render(meta: dict[str, Any], *, parameter_count: int, fingerprint: str, weights_file: str, weights_sha256: str,
           weights_format: str, evaluations: dict[str, float] | None = None, hub: bool = False) -> str:
  """The model card (Markdown) of an exported encoder; `hub` opens it with a model hub's metadata block."""
  model, contract = meta["model"], meta["contract"]
  variant = variant_name(model)
  title = f"ST-MEM encoder ({variant})" if variant else "ST-MEM encoder"
  width, heads = model["width"], model["num_heads"]
  leads = ", ".join(contract.get("leads", []))
  filters = (f"Butterworth order {contract.get('filter_order')}, high-pass {contract.get('highpass_hz')} Hz then "
             f"low-pass {contract.get('lowpass_hz')} Hz, zero phase, applied {contract.get('filter_stage')}")
  lines = [
    *(_front_matter(variant) if hub else []),
    f"# {title}",
    "",
    "Exported by `stmem export` (the stmem toolkit, a clean-room JAX implementation of ST-MEM: Na et al., "
    "\"Guiding Masked Representation Learning to Capture Spatio-Temporal Relationship of Electrocardiogram\", "
    "ICLR 2024).",
    "",
    "## Architecture",
    "",
    f"- Vision-transformer encoder over per-lead patches: width {width}, depth {model['depth']}, {heads} heads of "
    f"{width // heads}, MLP {model['mlp_ratio'] * width}, pre-LayerNorm blocks, exact GELU.",
    f"- Each lead is cut into {model['num_patches']} patches of {model['patch_size']} samples; patch embedding "
    "LayerNorm -> Linear -> LayerNorm; a SEP token at both ends of each lead; sin-cos positions "
    f"({model['num_patches'] + 2} rows) and one learned embedding per lead ({model['num_lead_ids']} leads).",
    "- Features: mean of all patch tokens of all leads after the last block, then the final LayerNorm "
    f"({width} numbers per ECG). The pretraining decoder is not part of this export.",
    f"- Parameters: {parameter_count:,} ({parameter_count / 1e6:.1f} M)",
    f"- Fingerprint: `{fingerprint}` ({FINGERPRINT_DEFINITION}; `stmem probe`, `embed` and `convert` print the same "
    "number for these weights)",
    "",
    "## Files",
    "",
    f"- `{weights_file}` ({weights_format}), SHA-256 `{weights_sha256}`. Tensor names and layouts are those of the "
    "ST-MEM authors' encoder-only checkpoint (PyTorch layout: Linear weights are (out, in); `pos_embedding` is "
    "(1, rows, width); `lead_embeddings.{i}` one vector per lead), so the file loads into their code as a state dict.",
    "- `config.json`: model configuration and preprocessing contract, machine-readable.",
    "- Into stmem: this folder is a checkpoint to `stmem probe`, `embed` and `export` (`--init_from FOLDER`); "
    "`stmem convert --reference FOLDER --out CHECKPOINT_DIR` makes an orbax checkpoint of it.",
    "",
    "## Input contract",
    "",
    "The numbers the encoder expects; feeding anything else gives meaningless features.",
    "",
    "| field | value |",
    "|---|---|",
    f"| sampling rate | {contract.get('fs')} Hz ({contract.get('resample')} resampling) |",
    f"| window | {contract.get('window')} samples, cut from records of {contract.get('record_samples')} |",
    f"| patch | {contract.get('patch_size')} samples |",
    f"| leads (embedding order) | {leads} |",
    f"| units | {contract.get('units')} before normalisation |",
    f"| filters | {filters} |",
    f"| normalisation | {contract.get('normalisation')} |",
    "",
    "## Training",
    "",
    *_training_lines(meta),
    "",
    "## Evaluation",
    "",
    *_evaluation_lines(evaluations or {}),
    "",
    "## Intended use and limitations",
    "",
    "- Research on ECG representations: linear probes, fine-tuning, embedding export. Not a medical device; not "
    "validated for diagnosis.",
    "- Features depend on the input contract above; other sampling rates, filters or normalisations shift them.",
    "",
    "## License",
    "",
    f"License: {LICENSE_PLACEHOLDER}",
    "",
    "The stmem code is Apache-2.0; that says nothing about these weights. Weights converted from the ST-MEM authors' "
    "release are under the authors' terms. The owner of the weights states their license here.",
    "",
  ]
  return "\n".join(lines)
