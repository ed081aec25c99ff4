"""`dinocell evaluate --checkpoint URI --manifest M --out DIR [--baseline init|none|URI]`: the CLI entry."""

from __future__ import annotations

from dinocell.eval.evaluate import DEFAULT_MAX_FIELDS, evaluate
from dinocell.log import get_logger

__all__ = ["evaluate_cli"]

log = get_logger(__name__)


def evaluate_cli(cfg, args) -> int:
    """Run the evaluation with the CLI's arguments; the manifest defaults to the config's data.manifest.

    Optional attributes read when the parser provides them: max_fields (default 256), channels (list), size,
    device, split.
    """
    manifest = args.manifest or cfg.data.manifest
    if not manifest:
        raise SystemExit("dinocell evaluate: give --manifest (or data.manifest): the field manifest with the "
                         "held-out split")
    max_fields = getattr(args, "max_fields", None)
    result = evaluate(
        args.checkpoint,
        manifest,
        cfg,
        args.out,
        baseline=getattr(args, "baseline", "init"),
        max_fields=DEFAULT_MAX_FIELDS if max_fields is None else int(max_fields),
        channels=getattr(args, "channels", None) or None,
        split=getattr(args, "split", None) or "val",
        size=getattr(args, "size", None),
        device=getattr(args, "device", None),
    )
    log.info("evaluation report: %s (%d files)", result.out_uri, len(result.files))
    return 0
