"""The model card (`README.md`) of a published model: what it is, how it was trained, how it scores, what it is not.

Rendered only from config.json's content and the evaluation metrics, with no timestamps, so that publishing the same
checkpoint twice gives the same bytes (an identical republish is a no-op).
"""

from __future__ import annotations

import json

from dinocell.model.cls_fold import CLS_SPACE_FOLDED

__all__ = ["metrics_table_rows", "render_model_card"]

_TABLE_COLUMNS = (
    ("model", "model"),
    ("embedding", "embedding"),
    ("views", "views"),
    ("same_field", "same-field sim."),
    ("different_field", "different-field sim."),
    ("gap", "gap"),
    ("top1", "retrieval top-1"),
    ("mrr", "retrieval MRR"),
    ("chance_top1", "chance top-1"),
)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table_rows(metrics: dict) -> list[list[str]]:
    """Rows of the card's metrics table: the evaluation's summary table when present, else every scalar."""
    table = metrics.get("table")
    if isinstance(table, list) and table and all(isinstance(r, dict) for r in table):
        return [[_fmt(r.get(key, "")) for key, _ in _TABLE_COLUMNS] for r in table]
    scalars = metrics.get("scalars") if isinstance(metrics.get("scalars"), dict) else metrics
    return [[str(k), _fmt(v)] for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _metrics_section(metrics: dict | None) -> str:
    if not metrics:
        return "No evaluation metrics were given when this version was published (see `dinocell evaluate`).\n"
    rows = metrics_table_rows(metrics)
    if isinstance(metrics.get("table"), list) and rows:
        header = [title for _, title in _TABLE_COLUMNS]
        data = metrics.get("data", {})
        intro = (
            "Channel consistency on held-out fields (`dinocell evaluate`, file `metrics.json`): every channel of a "
            "field is embedded on its own, plus the mean of the fluorescent channels. *same-field sim.* is the mean "
            "cosine similarity between different views of the same field (the seed's single number); "
            "*different-field sim.* the same between different fields (a collapsed model scores high on both); "
            "*gap* their difference; *retrieval* finds a field's view in one channel among all fields' views in "
            "another channel (top-1 accuracy and mean reciprocal rank, averaged over channel pairs).\n\n"
        )
        if data:
            intro += (
                f"Evaluated on {data.get('n_fields', '?')} fields of split `{data.get('split', '?')}` "
                f"({data.get('n_plates', '?')} plates), channels {', '.join(data.get('channels', []))}, "
                f"{data.get('size', '?')} px.\n\n"
            )
        return intro + _markdown_table(header, rows) + "\n"
    return "Metrics given at publishing time (`metrics.json`):\n\n" + _markdown_table(["metric", "value"], rows) + "\n"


def render_model_card(name: str, version: str, config: dict, metrics: dict | None) -> str:
    prov = config.get("provenance", {})
    norm = config.get("normalisation", {})
    crops = config.get("crop_sizes", {})
    channels = config.get("channels") or []
    data = prov.get("data", {})
    arch_rows = [
        ["architecture", str(config.get("architecture"))],
        ["patch size", str(config.get("patch_size"))],
        ["input channels", str(config.get("in_chans"))],
        ["width / depth / heads", f"{config.get('embed_dim')} / {config.get('depth')} / {config.get('num_heads')}"],
        ["MLP ratio", str(config.get("mlp_ratio"))],
        ["register (storage) tokens", str(config.get("n_storage_tokens"))],
        ["parameters", f"{config.get('n_parameters', '?'):,}" if isinstance(config.get("n_parameters"), int) else "?"],
        ["weights dtype", str(config.get("dtype"))],
        ["channels trained on", ", ".join(channels) or "unknown"],
        ["normalisation", f"x / 255, then (x - {norm.get('mean')}) / {norm.get('std')}"],
        ["crop sizes (global / local)", f"{crops.get('global')} / {crops.get('local')}"],
        ["source checkpoint", f"`{prov.get('checkpoint')}` ({prov.get('section')}, iteration {prov.get('iteration')})"],
        ["initial weights", f"`{prov.get('initial_weights')}`" if prov.get("initial_weights") else "random init"],
    ]
    passed = prov.get("passed_over") or []
    if passed:  # the run has newer checkpoints that could not be used: say so next to the one published
        arch_rows.append(["newer checkpoints not used", "; ".join(
            f"`{p.get('checkpoint')}` ({p.get('reason')})" for p in passed)])
    data_lines = ""
    if data:
        data_lines = "\nSelection in the training config:\n\n" + "\n".join(
            f"- {k}: `{json.dumps(v)}`" for k, v in data.items()) + "\n"
    how = "continued-pretrained" if prov.get("initial_weights") else "pretrained from random weights"
    untied = ""
    if config.get("untie_cls_and_patch_norms"):
        untied = ("\n\nThe CLS and register tokens have their own final norm (`cls_norm.*`, DINOv3's "
                  "`untie_cls_and_patch_norms=True`)")
        if config.get("cls_space") == CLS_SPACE_FOLDED:
            untied += (": the DINO head's input BatchNorm is folded into it, so the CLS is the per-dimension "
                       "standardised space the head's prototypes were trained on")
        untied += "."
    return f"""# {name} {version}

A DINOv3 vision transformer backbone {how} with self-supervision (DINO + iBOT + KoLeo, EMA teacher)
on Cell Painting fields with multi-view channel consistency: the teacher's view of the mean of the fluorescent
channels teaches the student's view of a single channel and back, so that every channel of a field maps to a
consistent representation. This is the EMA teacher's backbone (no heads).

## Use

```python
import dinocell
model = dinocell.load_pretrained("<this folder or its parent>")  # hashes verified, eval mode
# one grey channel per image: float [B, {config.get('in_chans')}, H, W],
# H and W multiples of {config.get('patch_size')}, x / 255 then (x - {norm.get('mean')}) / {norm.get('std')}
cls = model(images)                                    # [B, {config.get('embed_dim')}]
tokens = model.forward_features(images)["x_norm_patchtokens"]
```

`model.safetensors` uses the official DINOv3 key layout (the 188 keys of `dinov3_vits16_pretrain_lvd1689m` for
ViT-S), so the official DINOv3 code reads it with `load_state_dict` once its model is built with
`patch_size={config.get('patch_size')}` and `in_chans={config.get('in_chans')}`. The official hub loader builds
patch 16 / 3 channels and will refuse these shapes (`patch_embed.proj.weight` is
{config.get('patch_embed_shape')}); `dinocell.model.load_dinov3_checkpoint` reads the file directly (it also adapts
official patch-16 / 3-channel weights to other patch sizes and to 1 channel).{untied}

## Configuration

{_markdown_table(["", ""], arch_rows)}

## Training data

The fields of the training split (held-out plates were kept for evaluation) of the source that the training config
below selects: JUMP Cell Painting on the Cell Painting Gallery, or a bucket in its layout (e.g. `dinocell synth`'s).
{data_lines}
## Evaluation

{_metrics_section(metrics)}
## Limitations

- Self-supervised features: no labels were used; nothing here shows that the features predict biology (mechanism of
  action, perturbation identity) -- evaluate on your task.
- Channel consistency is measured on held-out plates of the same source(s); other microscopes, magnifications,
  stains or cell lines may behave differently. Brightfield transfer is whatever the evaluation above measured (no
  brightfield line in the table means it was not measured).
- Patch {config.get('patch_size')} at {crops.get('global')} px crops of fields downsampled as configured: features of
  very different pixel sizes are out of distribution.
- Integrity: `manifest.json` lists the sha256 of every file; `dinocell.load_pretrained` checks them.

## Licences

- Input data: JUMP Cell Painting data on the Cell Painting Gallery is released under CC0 1.0.
- Initial weights: Meta's DINOv3 weights are released under the DINOv3 License, and this model is derived from them
  when the initial weights above are a DINOv3 checkpoint. Users must check the DINOv3 License terms (the licence
  text distributed with the DINOv3 weights) before using or redistributing this model.
- Code: the dinocell code that produced it is under its own licence (see the repository).
"""
