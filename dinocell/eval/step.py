"""The evaluate step's one entry: `evaluate(...)`, called by `dinocell evaluate`, the KFP component and the demo.

It resolves the config, runs the channel-consistency evaluation of the checkpoint and its baseline on the held-out
fields (dinocell.eval.evaluate) and returns what the report directory holds (scalars for KFP Metrics, the Markdown
summary, the HTML report with its images embedded for the KFP UI).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dinocell import storage
from dinocell.config.step_args import StepError, load_step_config, str_list
from dinocell.log import get_logger

__all__ = ["EvalOutcome", "evaluate", "inline_images", "read_eval_outputs"]

log = get_logger("evaluate")


_IMG_SRC_RE = re.compile(r"""(<img\b[^>]*?\bsrc=)(["'])([^"':]+\.(?:png|jpe?g|svg))\2""", re.IGNORECASE)
_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml"}


def inline_images(html: str, base_uri: str) -> tuple[str, list[str]]:
    """Embed images that an HTML report references by relative path as data: URIs.

    The KFP UI shows an HTML artifact as one file; relative image links would be broken there. Returns the new HTML
    and the references that could not be read (left as they were, and reported).
    """
    missing: list[str] = []

    def repl(m: re.Match) -> str:
        rel = m.group(3)
        try:
            data = storage.read_bytes(storage.safe_join(base_uri, rel))
        except (storage.StorageError, ValueError) as e:
            missing.append(f"{rel} ({e})")
            return m.group(0)
        mime = _MIME[rel.rsplit(".", 1)[1].lower()]
        return f'{m.group(1)}{m.group(2)}data:{mime};base64,{base64.b64encode(data).decode()}{m.group(2)}'

    return _IMG_SRC_RE.sub(repl, html), missing


@dataclass
class EvalOutcome:
    out_uri: str
    scalars: dict[str, float]
    metrics_uri: str
    summary_md: str
    report_uri: str

    def report_html(self, inline: bool = True) -> str:
        """The report's HTML, with its images embedded (for places that show one file, like the KFP UI)."""
        html = storage.read_text(self.report_uri)
        if not inline:
            return html
        html, missing = inline_images(html, self.out_uri)
        if missing:
            log.warning("evaluate: %d image(s) of the report could not be embedded: %s", len(missing), missing)
        return html


def _number_scalars(raw: Mapping, where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    bad = []
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            bad.append(k)
        else:
            out[str(k)] = float(v)
    if bad:
        raise StepError(f"{where}: non-numeric scalar(s) {bad}")
    return out


def evaluate(
    config: str = "",
    overrides: Any = (),
    *,
    checkpoint_uri: str,
    out_uri: str,
    manifest_uri: str = "",
    baseline: str = "init",
    max_fields: int | None = None,
    channels: Any = (),
    split: str = "val",
    size: int | None = None,
    device: str | None = None,
    endpoint_url: str = "",
    anonymous: bool | None = None,
    view_mode: str = "both",
    seed: int = 0,
    profiling: bool = True,
    profile_fields: int | None = None,
    profile_normalisation: str = "mad",
    profile_null_size: int = 10000,
    cellprofiler: bool = True,
) -> EvalOutcome:
    """Channel-consistency evaluation of the checkpoint (and the baseline: "init", "none" or a checkpoint URI) on
    the manifest's `split` (default: the config's `data.manifest`, split "val"). `max_fields` None: 256.
    view_mode: "independent" (a random crop, flip and turn per view, seeded by `seed`), "aligned" (whole fields:
    layout-solvable) or "both"; the pixel baselines are scored next to the checkpoint either way.
    profiling: also the copairs mAP of well profiles on whole held-out plates (`profile_fields` fields at most,
    None: 2048), normalised per plate ("mad", "spherize", "mad+spherize", "none") against the negative controls;
    cellprofiler: with a CellProfiler-features row (cp_measure, the classical anchor) when it is installed.
    """
    from dinocell.eval.evaluate import DEFAULT_MAX_FIELDS, run_evaluation
    from dinocell.eval.profiles import METHODS
    from dinocell.eval.profiling import DEFAULT_PROFILE_FIELDS, ProfilingOptions
    from dinocell.eval.view_sampling import parse_view_modes

    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    manifest_uri = manifest_uri or cfg.data.manifest
    if not manifest_uri:
        raise StepError("evaluate: no field manifest: give --manifest (manifest_uri) or set data.manifest "
                        "(the manifest with the held-out split)")
    try:
        parse_view_modes(view_mode or "both")
    except ValueError as e:
        raise StepError(str(e)) from None
    if profile_normalisation not in METHODS:
        raise StepError(f"evaluate: profile normalisation {profile_normalisation!r} is not one of {list(METHODS)}")
    if int(profile_null_size) < 100:
        raise StepError(f"evaluate: profile null size must be >= 100 (p-values need a null), got {profile_null_size}")
    opts = ProfilingOptions(enabled=bool(profiling),
                            max_fields=DEFAULT_PROFILE_FIELDS if profile_fields is None else int(profile_fields),
                            normalisation=profile_normalisation, null_size=int(profile_null_size), seed=int(seed),
                            cellprofiler=bool(cellprofiler))
    t0 = time.perf_counter()
    run_evaluation(checkpoint_uri, manifest_uri, cfg, out_uri, baseline=baseline,
                   max_fields=DEFAULT_MAX_FIELDS if max_fields is None else int(max_fields),
                   channels=str_list(channels, "channels") or None, split=split or "val", size=size, device=device,
                   view_mode=view_mode or "both", seed=int(seed), profiling=opts)
    log.info("evaluate: %s in %.1fs", out_uri, time.perf_counter() - t0)
    return read_eval_outputs(out_uri)


def read_eval_outputs(out_uri: str) -> EvalOutcome:
    """What an evaluation left under `out_uri` (scalars.json, summary.md, metrics.json, report.html)."""
    scalars_uri = storage.join(out_uri, "scalars.json")
    try:
        raw = json.loads(storage.read_text(scalars_uri))
    except json.JSONDecodeError as e:
        raise StepError(f"{scalars_uri}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise StepError(f"{scalars_uri}: expected a mapping of name -> number")
    return EvalOutcome(
        out_uri=out_uri,
        scalars=_number_scalars(raw, scalars_uri),
        metrics_uri=storage.join(out_uri, "metrics.json"),
        summary_md=storage.read_text(storage.join(out_uri, "summary.md")),
        report_uri=storage.join(out_uri, "report.html"),
    )
