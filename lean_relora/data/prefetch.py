"""Micro-batches made ahead of the step, so that the step does not wait on data.

A background thread asks the data for micro-batch index, index + stride, ... (stride 1, or the number of ranks: rank
r of N takes micro-batches r, r + N, ...) and queues each with the data position after
it (`data.state_dict()`), pinned on CUDA so the copy to the GPU can overlap compute. Batches are a function of their
index (and, for a stream, of the position it was loaded at), so reading ahead changes nothing the step computes.
Tokenizing (a stream) and reading from the page cache (prepared files) release the GIL, so the thread runs
beside the step. `wait_seconds` is the time the step spent waiting for a batch, shown as "data wait".
"""

from __future__ import annotations

import queue
import threading
import time
import weakref

import torch

DEPTH = 4  # micro-batches kept ready
POLL = 0.1  # seconds between a blocked producer's looks at the stop flag


class BatchLoader:
    def __init__(self, data, batch_size: int, pin_memory: bool = False, depth: int = DEPTH, stride: int = 1,
                 offset: int = 0):
        self.data, self.batch_size, self.pin_memory, self.depth = data, batch_size, pin_memory, depth
        self.stride, self.offset = stride, offset  # this rank's micro-batches: offset, offset + stride, ...
        self.wait_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._next = 0

    def get(self, index: int) -> tuple[torch.Tensor, dict]:
        """Micro-batch `index` and the data position after it. Out of sequence, the thread starts again there."""
        if self._thread is None or index != self._next:
            self.close()
            self._start(index)
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        self._next = index + self.stride
        return item

    def _start(self, index: int) -> None:
        self._queue, self._stop = queue.Queue(self.depth), threading.Event()
        # The thread holds the data, not the loader: a loader dropped without close() (a Run built for one step)
        # is collected, and its finalizer stops the thread.
        self._thread = threading.Thread(target=_produce, name="lean-relora-batches", daemon=True,
                                        args=(self.data, self.batch_size, self.pin_memory, index, self.stride,
                                              self.offset, self._queue, self._stop))
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def close(self) -> None:
        """Stop the thread; it sees the stop within POLL seconds, also when blocked on a full queue."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None


def _produce(data, batch_size: int, pin_memory: bool, index: int, stride: int, offset: int, out: queue.Queue,
             stop: threading.Event) -> None:
    # A stream (no block count) is read in order: each rank reads every micro-batch of its group of `stride` and
    # keeps its own, so the position queued with it is the one after the group, the same on every rank.
    streamed = stride > 1 and data.num_train_blocks is None
    try:
        while not stop.is_set():
            if streamed:
                batch = [data.train_batch(index - offset + k, batch_size) for k in range(stride)][offset]
            else:
                batch = data.train_batch(index, batch_size)
            _put(out, (batch.pin_memory() if pin_memory else batch, data.state_dict()), stop)
            index += stride
    except BaseException as e:  # a DataError mid-stream surfaces in the step that asks for the batch
        _put(out, e, stop)


def _put(out: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=POLL)
            return
        except queue.Full:
            pass
