"""The pretrain step of the pipeline: `pretrain(cfg)` runs (or resumes) SSL pretraining on this rank.

`dinocell pretrain` (and torchrun, one process per GPU) calls it. The work is done by dinocell.train.loop.Trainer;
the pieces it assembles each live in their own module of dinocell.train:

    distributed   the rank's place in the torchrun job (process group, device)
    batches       the rank's training batches (shards or raw fields) and their resume state
    seeds         every random stream of a rank
    ssl_model     student + teacher and the DINO / iBOT / KoLeo forward-backward (SSLMetaArch)
    ema           the EMA teacher update
    optim         AdamW with per-layer lr decay; schedules: lr / wd / momentum / teacher temperature
    checkpoint    crash-safe checkpoints and RNG state capture
    preemption    SIGTERM -> checkpoint -> exit 143 (the restarted job resumes)
    visualize     attention / PCA / consistency images during training
"""

from __future__ import annotations

from collections.abc import Callable

from dinocell.train.loop import NonFiniteLossError, PretrainResult, Trainer

__all__ = ["NonFiniteLossError", "PretrainResult", "pretrain"]


def pretrain(cfg, on_iteration: Callable[[int, dict], None] | None = None) -> PretrainResult:
    """Run (or resume) SSL pretraining as configured; returns where the final checkpoint and logs are.

    `on_iteration(iteration, info)` is called on every rank at the end of each iteration, after its logging and
    checkpoint (info: rank, world_size, field_ids, applied, losses, masks (the iteration's iBOT MaskBatch),
    trainer): a hook for monitoring and tests; an exception it raises ends the run like a crash (no final
    checkpoint).

    SIGTERM (preemption, node drain) while it runs: every rank finishes the iteration, the checkpoint of that
    iteration is written and `Preempted` (dinocell.train.preemption; a SystemExit with status 143) is raised, so the
    process exits non-zero and the restarted job resumes from that checkpoint.
    """
    trainer = Trainer(cfg, on_iteration=on_iteration)
    completed = False
    try:
        result = trainer.run()
        completed = True
        return result
    finally:
        trainer.close(completed=completed)
