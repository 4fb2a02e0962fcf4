"""cli.launch: what the launcher of several ranks asks of torchrun and of the GPU, on the versions users have."""

import subprocess

import pytest
import torch

from lean_relora.cli import launch as launcher


@pytest.mark.parametrize("trains_here", [True, False])
def test_the_launcher_asks_a_child_for_the_free_gpu_memory_and_a_rank_asks_itself(monkeypatch, trains_here):
    # A launcher that opened a CUDA context would hold ~0.5 GiB of GPU 0 for the whole job.
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(("here", device)) or (7, 9))

    def child(argv, **kwargs):
        asked.append(("child", argv[-1]))
        return subprocess.CompletedProcess(argv, 0, stdout="5\n", stderr="")

    monkeypatch.setattr(launcher.subprocess, "run", child)
    free = launcher.free_gpu_bytes(torch.device("cuda", 1), trains_here=trains_here)
    assert (free, [where for where, _ in asked]) == ((7, ["here"]) if trains_here else (5, ["child"]))
    assert trains_here or asked[0][1] == "1"


def test_torchrun_is_given_the_shutdown_timeout_only_where_it_knows_the_option(monkeypatch):
    import argparse

    import torch.distributed.run as torchrun

    old = argparse.ArgumentParser()  # the torchrun of torch 2.11: no --shutdown-timeout (it exits 2 on one)
    old.add_argument("--nproc-per-node")
    monkeypatch.setattr(torchrun, "get_args_parser", lambda: old)
    assert launcher.shutdown_timeout() == []
    monkeypatch.undo()
    has_it = "--shutdown-timeout" in torchrun.get_args_parser()._option_string_actions
    assert launcher.shutdown_timeout() == (["--shutdown-timeout", str(launcher.SHUTDOWN_SECONDS)] if has_it else [])
