"""`ResumableLoader`: a DataLoader that knows its place in the epoch and implements Lightning's
`state_dict` / `load_state_dict` protocol for loaders, so a run killed mid-epoch continues with
exactly the batches the epoch had left.

Lightning saves the training loader's state in every checkpoint, but (2.6) restores it only when
the loader is built after the loop state is restored, and `trainer.estimated_stepping_batches`
in `configure_optimizers` builds it before (Lightning issue #20550): the state is then silently
dropped. So `DistillDataModule` also keeps the loader's state (a DataModule is restored before
any loader is built) and hands it to the loader through `pending`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """Knows how many batches of the current pass the training loop has finished. A subclass
    starts each pass from `take_resume()` (None, or the (epoch, batches done) of a restored
    checkpoint, to be skipped: from `load_state_dict`, else from its `pending` callable) and
    says where the pass started (`pass_start`: its epoch and the batches skipped).

    A batch counts as done when `mmkd.callbacks.TrackTrainedBatches` reports its end: a
    checkpoint saved on an interrupt in the middle of a step must not count the batch being
    trained. Without that
    callback, the batches handed out count (Lightning's fetcher draws no batch ahead of the loop
    from a loader with a length, and every `ResumableLoader` has one)."""

    resume: tuple[int, int] | None = None  # from `load_state_dict`, for the next pass
    pending: Callable[[], tuple[int, int] | None] | None = None  # else asked for one
    tracked = False  # whether TrackTrainedBatches reports the batches finished

    def pass_start(self) -> tuple[int, int]:
        """(epoch, batches skipped) of the current pass."""
        raise NotImplementedError

    def take_resume(self) -> tuple[int, int] | None:
        resume, self.resume = self.resume, None
        if resume is None and self.pending is not None:
            resume = self.pending()
        return resume

    def __iter__(self) -> Iterator[Any]:
        self._drawn = self._trained = 0
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._drawn += 1
            yield batch

    def batch_trained(self) -> None:
        self._trained += 1

    def state_dict(self) -> dict[str, int]:
        """Where training stands: {"epoch", "batches_done"} (saved in every checkpoint)."""
        if self.resume is not None:  # restored, and no pass started since
            return {"epoch": self.resume[0], "batches_done": self.resume[1]}
        epoch, skipped = self.pass_start()
        done = getattr(self, "_trained" if self.tracked else "_drawn", 0)
        return {"epoch": epoch, "batches_done": skipped + done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume = (int(state["epoch"]), int(state["batches_done"]))
