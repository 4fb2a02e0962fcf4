"""Micro-batches made ahead of the step, so that the step does not wait on data.

A background thread asks the data for micro-batch index, index + 1, ... and queues each with the data position after
it (`data.state_dict()`), pinned on CUDA so the copy to the GPU can overlap compute. Batches are a function of their
index (and, for a stream, of the position it was loaded at), so reading ahead changes nothing the step computes.
Tokenizing (a stream) and reading from the page cache (prepared files) release the GIL, so the thread runs
beside the step. `wait_seconds` is the time the step spent waiting for a batch, shown as "data wait".
"""

from __future__ import annotations

import queue
import threading
import time

import torch

DEPTH = 4  # micro-batches kept ready


class BatchLoader:
    def __init__(self, data, batch_size: int, pin_memory: bool = False, depth: int = DEPTH):
        self.data, self.batch_size, self.pin_memory, self.depth = data, batch_size, pin_memory, depth
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
        self._next = index + 1
        return item

    def _start(self, index: int) -> None:
        self._queue, self._stop = queue.Queue(self.depth), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(index, self._queue, self._stop),
                                        name="lean-relora-batches", daemon=True)
        self._thread.start()

    def _produce(self, index: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = self.data.train_batch(index, self.batch_size)
                if self.pin_memory:
                    batch = batch.pin_memory()
                out.put((batch, self.data.state_dict()))
                index += 1
        except BaseException as e:  # a DataError mid-stream surfaces in the step that asks for the batch
            out.put(e)

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue: drain until it has seen the stop)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.01)
        self._thread = None
