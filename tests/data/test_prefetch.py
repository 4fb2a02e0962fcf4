"""lean_relora.data.prefetch: batches made ahead equal the data's own, in any order asked, and errors reach the step."""

import gc
import threading

import numpy as np
import pytest
import torch

from lean_relora.data.corpus import DataError
from lean_relora.data.packing import PackedData
from lean_relora.data.prefetch import BatchLoader


def data(n=50):
    blocks = np.arange(n * 4, dtype=np.uint16).reshape(n, 4)
    return PackedData(blocks, blocks[:2], seed=3, vocab_size=n * 4)


def test_batches_equal_the_datas_own_in_sequence_and_after_a_jump():
    source = data()
    loader = BatchLoader(source, 3, depth=2)
    for index in [0, 1, 2, 3, 17, 18, 5, 6, 40]:
        batch, state = loader.get(index)
        assert batch.dtype == torch.long and batch.equal(source.train_batch(index, 3)) and state == {}
    thread = loader._thread
    loader.close()
    assert not thread.is_alive()


def test_a_loader_dropped_without_close_stops_its_thread():
    loader = BatchLoader(data(), 3, depth=1)
    loader.get(0)
    thread = loader._thread
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_the_step_waits_only_when_the_producer_is_slow():
    class Slow:
        def __init__(self):
            self.gate = threading.Event()

        def train_batch(self, index, batch_size):
            self.gate.wait()
            return torch.full((batch_size, 2), index)

        def state_dict(self):
            return {"after": 1}

    slow = Slow()
    loader = BatchLoader(slow, 2)
    timer = threading.Timer(0.2, slow.gate.set)
    timer.start()
    batch, state = loader.get(0)
    assert loader.wait_seconds >= 0.15 and batch.tolist() == [[0, 0], [0, 0]] and state == {"after": 1}
    waited = loader.wait_seconds
    loader.get(1)  # made while the first was in use: ready
    assert loader.wait_seconds - waited < 0.1
    loader.close()


def test_an_error_in_the_producer_is_raised_by_get():
    class Broken:
        def train_batch(self, index, batch_size):
            if index == 2:
                raise DataError("data.source = 'x': the stream ended early")
            return torch.zeros(batch_size, 2, dtype=torch.long)

        def state_dict(self):
            return {}

    loader = BatchLoader(Broken(), 1)
    loader.get(0), loader.get(1)
    with pytest.raises(DataError, match="the stream ended early"):
        loader.get(2)
    loader.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (CPU-only machine)")
def test_on_cuda_batches_come_pinned_and_copy_without_blocking():
    source = data()
    loader = BatchLoader(source, 3, pin_memory=True)
    batch, _ = loader.get(0)
    assert batch.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert on_gpu.cpu().equal(source.train_batch(0, 3))
    loader.close()


class InOrder:
    """A stream as the loader sees it: no block count, micro-batches served only in order (else it fails)."""

    num_train_blocks = None

    def __init__(self):
        self.next = 0

    def train_batch(self, index, batch_size):
        assert index == self.next, f"asked for {index} out of order (next: {self.next})"
        self.next += 1
        return torch.full((batch_size, 2), index)

    def state_dict(self):
        return {"index": self.next}


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_gets_every_nth_micro_batch_and_a_stream_position_after_the_whole_group(ranks):
    source = data()
    for rank in range(ranks):
        loader = BatchLoader(source, 3, depth=2, stride=ranks, offset=rank)
        assert all(loader.get(g * ranks + rank)[0].equal(source.train_batch(g * ranks + rank, 3)) for g in range(5))
        loader.close()
        stream = BatchLoader(InOrder(), 3, depth=2, stride=ranks, offset=rank)
        for group in range(5):
            batch, state = stream.get(group * ranks + rank)
            # its own micro-batch, read in order with the others', and the position every rank saves alike
            assert batch.unique().tolist() == [group * ranks + rank] and state == {"index": (group + 1) * ranks}
        stream.close()
