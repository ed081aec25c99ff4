"""The epoch of a streaming dataset, kept in shared memory: `set_epoch(e)` in the main process reaches the
DataLoader workers, persistent ones included, at their next `iter()` (like DistributedSampler.set_epoch)."""

from __future__ import annotations

from ctypes import c_int64
from multiprocessing.sharedctypes import RawValue

__all__ = ["SharedEpoch"]


class SharedEpoch:
    """Mixin giving a dataset `set_epoch` / `epoch` backed by one shared int64.

    Call `_init_epoch()` in `__init__` (in the main process, before any DataLoader forks or spawns workers).
    """

    def _init_epoch(self) -> None:
        self._epoch = RawValue(c_int64, 0)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (finite mode: call it before each epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)
