"""Data parallelism on 2 real CPU processes (gloo): the sharded masters and their merge in processes spawned here,
and whole runs started through `lean-relora train --nproc 2` (torchrun), compared with one process."""

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY, invoke, tiny_model
from safetensors.torch import load_file

from lean_relora.model.build import build_model
from lean_relora.model.relora import relora_layers, target_modules, wrap_model
from lean_relora.recipe import LoraConfig
from lean_relora.training import distributed
from lean_relora.training.checkpoint import CHECKPOINTS
from lean_relora.training.restart import merge_cycle

# The tiny CLI recipe, long enough for 6 restarts (at steps 6, 10, ..., 26) and a checkpoint after each.
RECIPE = TINY.replace("restart_every = 3", "restart_every = 4\nwarm_start_steps = 2\ncheck_ranks = true").replace(
    "max_steps = 7", "max_steps = 30").replace("every = 3\nbatches = 2", "every = 0\nbatches = 2") + \
    "[checkpoint]\nevery = 4\nkeep_last = 10\n"
LIMIT = 600  # seconds a launch may take before the test gives up (a launch takes ~25 s on 2 idle cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- spawned ranks


def _tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_model(), vocab_size=128, seq_len=32)


def _wrapped(cfg: LoraConfig, ranks: distributed.Ranks):
    model = _tiny_model()
    owned = ranks.owned(target_modules(model, cfg.targets))
    wrap_model(model, cfg, keep_master=True, dtype=torch.float32, generator=torch.Generator().manual_seed(1),
               owned=owned)
    for index, layer in enumerate(relora_layers(model)):  # a non-zero update, the same on every rank
        g = torch.Generator().manual_seed(100 + index)
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.05
        layer.lora_A.data = torch.randn(layer.lora_A.shape, generator=g) * 0.05
    return model


def _sharded_rank(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = distributed.join()
    try:
        for quant in ("nf4", "int8"):  # stored forms with different quant state: 4-bit absmax (nested), row absmax
            _check_sharded(rank, ranks, LoraConfig(rank=4, quant=quant))
    finally:
        distributed.leave()


def _check_sharded(rank: int, ranks: distributed.Ranks, cfg: LoraConfig) -> None:
    solo, sharded = _wrapped(cfg, distributed.SOLO), _wrapped(cfg, ranks)
    solo_layers, layers = relora_layers(solo), relora_layers(sharded)
    # (c) this rank holds the masters of its own layers and no others: bytes counted
    total = sum(layer.base.master.tensor.nbytes for layer in solo_layers)
    mine = sum(layer.base.master.tensor.nbytes for layer in layers if layer.base.master is not None)
    shares = ranks.gather(mine)
    largest = max(layer.base.master.tensor.nbytes for layer in solo_layers)
    assert sum(shares) == total and all(0 < share <= total / 2 + largest for share in shares), (shares, total)
    owners = ranks.owners([layer.base.in_features * layer.base.out_features for layer in layers])
    assert [layer.base.master is not None for layer in layers] == [o == rank for o in owners]
    assert ranks.gather(owners)[0] == owners  # every rank computes the same assignment
    # (b) the sharded merge leaves the stored base bit-identical to one process's merge, on every rank
    merge_cycle(solo, distributed.SOLO, torch.Generator().manual_seed(5))
    merge_cycle(sharded, ranks, torch.Generator().manual_seed(5))  # the same routine, several ranks
    for one, this in zip(solo_layers, layers):
        stored = list(zip(one.base.stored_tensors(), this.base.stored_tensors()))
        assert stored and all(torch.equal(a, b) for a, b in stored)
        assert torch.equal(one.lora_A, this.lora_A) and not this.lora_B.any()  # same re-draw, fresh cycle
        if this.base.master is not None:
            assert torch.equal(one.base.master.tensor, this.base.master.tensor)
        assert torch.equal(one.base.probe.now, this.base.probe.now)
    digest = ranks.check_identical(layers)
    assert ranks.gather(digest) == [digest, digest]
    if rank == 1:  # one flipped code is caught, on every rank
        layers[3].base.stored_tensors()[0].view(-1)[0] += 1
    with pytest.raises(RuntimeError, match="ReLoRA layer 3: rank"):
        ranks.check_identical(layers)


def test_each_rank_keeps_only_its_masters_and_the_sharded_merge_equals_one_process():
    mp.spawn(_sharded_rank, args=(free_port(),), nprocs=2, join=True)


def test_owners_balance_bytes_greedily_and_deterministically():
    ranks = distributed.Ranks(0, 3)
    # largest first, each to the least-loaded rank (ties: the lower): 40 | 10, 10 | 10, 5, 5
    assert ranks.owners([10, 10, 10, 40, 5, 5]) == [1, 2, 1, 0, 2, 2]
    assert distributed.Ranks(1, 3).owners([10, 10, 10, 40, 5, 5]) == [1, 2, 1, 0, 2, 2]  # the same on every rank
    assert distributed.SOLO.owners([3, 2, 1]) == [0, 0, 0] and distributed.SOLO.owned([]) is None


# ----------------------------------------------------------------------------------------------- whole runs


def launch(recipe: Path, run_dir: Path, *args, nproc: int = 2, wait: bool = True, env: dict | None = None):
    command = [sys.executable, "-m", "lean_relora", "train", str(recipe), "--run-dir", str(run_dir),
               "--nproc", str(nproc), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=LIMIT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


def stored_bases(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The stored base of every layer: packed 4-bit codes and their quant state."""
    model, bases = load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "base.safetensors")
    return {**{k: v for k, v in model.items() if k.endswith(".packed")},
            **{k: v for k, v in bases.items() if ".quant_state." in k}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The recipe on 2 ranks of micro-batch 4 (checked across ranks at every restart)."""
    root = tmp_path_factory.mktemp("ranks")
    (root / "tiny.toml").write_text(RECIPE)
    launch(root / "tiny.toml", root / "two")
    return root


def test_two_ranks_of_micro_batch_4_give_the_losses_of_one_process_of_8_across_restarts(two_ranks, tmp_path):
    one, two = tmp_path / "one", two_ranks / "two"
    launch(two_ranks / "tiny.toml", one, "--set", "train.micro_batch_size=8", nproc=1)
    assert [s for s, _ in losses(two)] == list(range(1, 31)) == [s for s, _ in losses(one)]
    assert [r["tokens"] for r in records(two) if "loss" in r] == [r["tokens"] for r in records(one) if "loss" in r]
    restarts = [r["step"] for r in records(two) if "restart" in r]
    assert restarts == [r["step"] for r in records(one) if "restart" in r] == [6, 10, 14, 18, 22, 26]
    # A batch of 8 split in two sums its gradients in another order: float rounding, which 30 steps of training
    # on a 4-bit base and 8-bit moments grow to about 1e-4 (measured: 1.05e-4 at step 30, 1.5e-6 up to step 12).
    assert [loss for _, loss in losses(two)] == pytest.approx([loss for _, loss in losses(one)], rel=3e-4, abs=0)
    assert [loss for _, loss in losses(two)][:12] == pytest.approx([loss for _, loss in losses(one)][:12], rel=1e-5,
                                                                   abs=0)
    assert losses(two)[-1][1] < losses(two)[0][1] - 0.5  # it trained


def test_two_ranks_equal_one_process_accumulating_their_micro_batches_bit_for_bit(two_ranks, tmp_path):
    """1 x micro-batch 4 x 2 accumulated computes each rank's micro-batch as it is, and halving a gradient is exact,
    so the sum DDP averages is the one accumulation makes: same losses, same stored bases after every restart."""
    one, two = tmp_path / "one", two_ranks / "two"
    launch(two_ranks / "tiny.toml", one, "--set", "train.grad_accum_steps=2", nproc=1)
    assert losses(two) == losses(one) and len(losses(two)) == 30
    # (b) the ranks compared their stored bases at every restart (a difference stops the run), and they are the
    # single process's, code for code, after each of the 6 restarts
    assert sum(len(r.get("bases_sha256", "")) == 64 for r in records(two) if "restart" in r) == 6
    for step in (8, 12, 16, 20, 24, 28):
        name = f"step-{step:08d}"
        mine, theirs = stored_bases(two / CHECKPOINTS / name), stored_bases(one / CHECKPOINTS / name)
        assert mine.keys() == theirs.keys() and len(mine) > 14
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), (step, key)


def test_a_checkpoint_holds_every_master_written_by_its_owner_and_refuses_another_rank_count(two_ranks, tmp_path):
    checkpoint = two_ranks / "two" / CHECKPOINTS / "step-00000030"
    meta = json.loads((checkpoint / "meta.json").read_text())
    masters = sorted(f for f in meta["files"] if f.startswith("masters/"))
    assert len(masters) == 14 and all((checkpoint / f).stat().st_size == meta["files"][f]["bytes"] for f in masters)
    assert "master" not in "".join(load_file(checkpoint / "base.safetensors"))  # not replicated by rank 0
    code, output = invoke("export", checkpoint, tmp_path / "hf")  # export folds the factors into those masters
    assert code == 0 and (tmp_path / "hf" / "config.json").exists(), output
    run = Path(shutil.copytree(two_ranks / "two", tmp_path / "run"))
    code, output = invoke("train", "--run-dir", run, "--resume", str(run / CHECKPOINTS / "step-00000020"))
    assert code == 2 and output.count("\n") == 1, output
    assert "trained by 2 process(es), resumed by 1" in output and "--nproc 2" in output
    # forced, one process takes every master back (the layer files fit any rank count) and finishes the run
    code, output = invoke("train", "--run-dir", run, "--resume", str(run / CHECKPOINTS / "step-00000020"), "--force")
    assert code == 0, output
    assert "resuming with 1 process(es) instead of the checkpoint's 2 (forced)" in output


def test_sigterm_to_the_launcher_stops_every_rank_after_one_step_and_resume_reproduces_the_run(two_ranks, tmp_path):
    stopped, k = tmp_path / "stopped", 2
    # Each rank waits before step k + 1 until SIGTERM has reached it (paused_ranks/sitecustomize.py): the stop point
    # is step k + 1 however loaded the machine is, and step k's record means the stop handlers are armed.
    pause = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "paused_ranks"),
                                            os.environ.get("PYTHONPATH", "")]), "PAUSE_AFTER_STEP": str(k)}
    process = launch(two_ranks / "tiny.toml", stopped, "--set", "checkpoint.every=0", wait=False, env=pause)
    deadline = time.monotonic() + LIMIT
    while time.monotonic() < deadline and process.poll() is None:
        if (stopped / "metrics.jsonl").exists() and len(losses(stopped)) >= k:
            process.send_signal(signal.SIGTERM)  # to the launcher: torchrun's agent, run inside lean-relora
            break
        time.sleep(0.01)
    _, stderr = process.communicate(timeout=LIMIT)
    assert process.returncode == 75, stderr[-3000:]  # saved and stopped, as one process reports it
    k += 1  # the step under way when the signal arrived is finished, then the job stops
    assert len(losses(stopped)) == k, stderr[-3000:]
    assert stderr.count(f"SIGTERM: stopped after step {k} of 30") == 1, stderr[-3000:]  # rank 0 alone reports
    checkpoints = [p.name for p in (stopped / CHECKPOINTS).iterdir() if p.name.startswith("step-")]
    assert checkpoints == [f"step-{k:08d}"]  # saved once, by the job, after the same step on both ranks
    launch(two_ranks / "tiny.toml", stopped, "--resume", "auto", "--set", "checkpoint.every=0")
    assert losses(stopped) == losses(two_ranks / "two")  # exactly


def test_memory_estimate_per_gpu_and_per_host_for_several_ranks():
    from lean_relora.memory.analytic import recipe_vocab_size, target_shapes, with_model_sizes
    from lean_relora.memory.estimate import estimate
    from lean_relora.recipe import load_recipe

    recipe = load_recipe(None)  # the tiny default: 28 ReLoRA layers, quick to trace
    one, four = estimate(recipe, baseline=False), estimate(recipe, baseline=False, nproc=4)
    trainable = one.phases[0].components["trainable weights"]
    assert four.phases[0].ddp_buckets == trainable > 0 and one.phases[0].ddp_buckets == 0
    for mine, theirs in zip(four.phases, one.phases):  # DDP's gradient copy, allocator reserve on top
        assert mine.need == pytest.approx(theirs.need + 1.1 * theirs.components["trainable weights"])
    masters = one.host.masters  # 7B: 4 bytes per base weight, all on one rank
    largest = 4 * max(o * i for o, i in target_shapes(with_model_sizes(recipe), recipe_vocab_size(recipe)))
    assert masters == 4 * 4 * (4 * 256 * 256 + 3 * 256 * 688) and four.host.masters_total == masters
    assert masters / 4 <= four.host.masters <= masters / 4 + largest  # the largest share, a layer at most above
    assert four.host.peak - four.host.masters == one.host.peak - masters  # what is not masters, each rank has
    assert four.host_per_host == 4 * (four.host.peak - four.host.masters) + masters
    code, output = invoke("memory-estimate", "--nproc", "4")  # the tiny default recipe: quick to trace
    assert code == 0 and "each of 4 GPUs" in output and "peak of the host (4 ranks on it)" in output, output


def test_ddp_is_told_not_to_sync_buffers_by_the_name_its_torch_knows():
    class DDPOfTorch211:  # torch <= 2.12: no forward_sync_buffers (passing it raises TypeError on every rank)
        def __init__(self, module, device_ids=None, broadcast_buffers=True, bucket_cap_mb=None):
            pass

    assert distributed.no_buffer_sync(DDPOfTorch211) == {"broadcast_buffers": False}
    DDPOfTorch211(None, **distributed.no_buffer_sync(DDPOfTorch211))
    here = distributed.no_buffer_sync(torch.nn.parallel.DistributedDataParallel)
    has_new_name = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    assert here == ({"forward_sync_buffers": False} if has_new_name else {"broadcast_buffers": False})
