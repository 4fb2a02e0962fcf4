"""master: the fp32 masters in RAM or on disk; a disk master's generations, checkpoints that link them, kill -9."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from helpers import run_dir, tiny_recipe

from lean_relora.model.frozen_base import FrozenBase
from lean_relora.model.master import DiskMasters, RamMaster
from lean_relora.training import checkpoint
from lean_relora.training.loop import train


def disk(recipe, **relora):
    return replace(recipe, relora=replace(recipe.relora, master="disk", **relora))


def step_losses(directory: Path) -> dict[int, float]:
    """Loss per step; a step redone after a kill keeps its last record."""
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_merge_on_a_disk_master_equals_the_ram_master_and_never_rewrites_a_file(tmp_path):
    w = torch.randn(64, 128) * 0.02
    store = DiskMasters(tmp_path / "master")
    on_disk = FrozenBase(w, None, "nf4", dtype=torch.float32, master=store.create("layer", w))
    in_ram = FrozenBase(w, None, "nf4", dtype=torch.float32, master=RamMaster(w))
    first = on_disk.master.path
    before = first.read_bytes()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        up, down = torch.randn(64, 4, generator=g) * 1e-3, torch.randn(4, 128, generator=g)
        for base in (on_disk, in_ram):
            base.add_low_rank_(up, down, 1.0)
    assert torch.equal(on_disk.master.read(), in_ram.master.read())
    assert torch.equal(on_disk.packed, in_ram.packed)
    assert on_disk.master.generation == 3 and first.read_bytes() == before  # generation 0 untouched
    store.collect()
    assert sorted(p.name for p in store.root.iterdir()) == ["gen-000003"]


def test_disk_master_run_equals_ram_master_run_and_checkpoints_link_the_masters(tmp_path, tokenizer_cache):
    (tmp_path / "ram").mkdir(), (tmp_path / "disk").mkdir()
    recipe = tiny_recipe(steps=12, restart_every=4)
    train(recipe, run_dir(tmp_path / "ram", tokenizer_cache))
    directory = run_dir(tmp_path / "disk", tokenizer_cache)
    train(disk(recipe), directory)
    assert step_losses(directory) == step_losses(tmp_path / "ram")
    latest, _ = checkpoint.find_latest(directory)
    linked = sorted((latest / checkpoint.CHECKPOINT_MASTERS).iterdir())
    assert len(linked) == 14  # 2 layers x 7 projections
    current = directory / "master" / "gen-000002"  # two restarts: steps 4 and 8
    for file in linked:
        layer = file.name.removesuffix(".base.f32")  # named for the FrozenBase module, the store for its layer
        assert os.path.samefile(file, current / f"{layer}.f32")  # a hard link, not a copy
    assert not any(k.endswith(".master") for k in checkpoint.load_file(latest / checkpoint.BASE))


def test_disk_use_is_bounded_by_the_checkpoints_kept(tmp_path, tokenizer_cache):
    recipe = disk(tiny_recipe(steps=24, restart_every=3))
    recipe = replace(recipe, checkpoint=replace(recipe.checkpoint, every=2, keep_last=2))
    directory = run_dir(tmp_path, tokenizer_cache)
    train(recipe, directory)  # 7 merge generations written
    inodes = {f.stat().st_ino for f in directory.rglob("*.f32")}
    assert len(inodes) <= (recipe.checkpoint.keep_last + 1) * 14
    assert len(list((directory / "master").iterdir())) == 1


KILL_DURING_MERGE = """
import os, signal, sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import tiny_recipe
from lean_relora.model import master
from lean_relora.training.loop import train

write = master.DiskMaster.write
def write_then_die(self, dense, generation=None):
    write(self, dense, generation)
    if self.generation == 2 and self.name.endswith("layers.0.mlp.gate_proj"):  # mid-way through the 2nd merge
        os.kill(os.getpid(), signal.SIGKILL)
master.DiskMaster.write = write_then_die
recipe = tiny_recipe(steps=12, restart_every=4)
recipe = replace(recipe, relora=replace(recipe.relora, master="disk"),
                 checkpoint=replace(recipe.checkpoint, every=3))
train(recipe, Path({run!r}))
"""


def test_kill_9_during_a_merge_resumes_to_the_uninterrupted_losses(tmp_path, tokenizer_cache):
    (tmp_path / "whole").mkdir(), (tmp_path / "killed").mkdir()
    recipe = disk(tiny_recipe(steps=12, restart_every=4))
    recipe = replace(recipe, checkpoint=replace(recipe.checkpoint, every=3))
    whole = run_dir(tmp_path / "whole", tokenizer_cache)
    train(recipe, whole)
    killed = run_dir(tmp_path / "killed", tokenizer_cache)
    script = KILL_DURING_MERGE.format(tests=str(Path(__file__).parents[1]), run=str(killed))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -9, result.stderr[-2000:]
    assert (killed / "master" / "gen-000002").is_dir()  # the second merge was under way
    assert checkpoint.find_latest(killed)[0].name == "step-00000006"
    train(recipe, killed, resume="auto")
    assert step_losses(killed) == step_losses(whole)
