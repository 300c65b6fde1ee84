"""Train batches put on the devices ahead of the step that uses them, without losing the loader position.

The loop asks for step k's batch right before dispatching step k; with `DevicePrefetcher`, that batch
was read and sent to the devices (`make_global_batch`, an asynchronous host-to-device copy) while
step k - 1 ran, and step k + 1's is sent right after. The Grain iterator is then `depth` batches
ahead of training, so a checkpoint must not save its live position: `position()` gives the position
from before the oldest batch not yet trained, which a resumed run continues from.
"""

from __future__ import annotations

import collections
import json

from jaxpretrain import parallel


class LoaderPosition:
    """A fixed Grain iterator state, in the form Grain's checkpoint handler saves (`get_state()` ->
    JSON bytes), so the checkpoint file is the one the iterator itself would write."""

    def __init__(self, state):
        self._state = state

    def get_state(self) -> bytes:
        state = self._state
        return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()


class DevicePrefetcher:
    """`next()` -> the next global batch (on the devices), with `depth` more already on their way."""

    def __init__(self, iterator, mesh, depth: int = 1):
        self._it, self._mesh, self._depth = iterator, mesh, depth
        self._queue: collections.deque = collections.deque()  # (loader state before the batch, batch)
        self._exhausted = False

    def _fill(self, n: int) -> None:
        while not self._exhausted and len(self._queue) < n:
            state = self._it.get_state()
            try:
                local = next(self._it)
            except StopIteration:
                self._exhausted = True
                return
            self._queue.append((state, parallel.make_global_batch(local, self._mesh)))

    def __iter__(self):
        return self

    def __next__(self):
        self._fill(1)
        if not self._queue:
            raise StopIteration
        _, batch = self._queue.popleft()
        self._fill(self._depth)  # the next batches' copies start now, while this one's step runs
        return batch

    def position(self) -> LoaderPosition:
        """The loader position of the next batch to train (what a checkpoint must save)."""
        return LoaderPosition(self._queue[0][0] if self._queue else self._it.get_state())
