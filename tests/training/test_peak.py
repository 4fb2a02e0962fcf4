"""Every run's measured peak memory beside the estimate: metrics.jsonl records, the summary line, the warning."""

import io
import json

import pytest
import torch
from helpers import cuda_recipe, run_dir, tiny_recipe
from rich.console import Console

from lean_relora.memory.estimate import phase_estimates
from lean_relora.training import peak
from lean_relora.training.loop import train
from lean_relora.training.peak import RELORA, WARM, PeakMemory
from lean_relora.training.progress import Reporter


def memory_records(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if "memory" in r]


def test_a_cpu_run_records_its_peak_rss_beside_the_host_estimate(tmp_path, tokenizer_cache):
    directory = run_dir(tmp_path, tokenizer_cache)
    recipe = tiny_recipe(steps=7, warm_start=2, restart_every=3)
    recipe.eval.every = 4
    console = Console(file=io.StringIO(), width=200)
    summary = train(recipe, directory, reporter=Reporter(directory / "metrics.jsonl", 7, console=console, live=False),
                    estimate_peaks=phase_estimates)
    records = memory_records(directory / "metrics.jsonl")
    # the warm start's first steps and its end (2), ReLoRA's first steps and the evaluation (4), the first step
    # after the first restart (6, the restart came after step 5), the last step (7)
    assert [(r["step"], r["phase"]) for r in records] == [(2, WARM), (4, RELORA), (6, RELORA), (7, RELORA)]
    for r in records:
        assert r["memory"] == "host" and r["measured"] == r["peak_rss"] > 100 * 2**20
        assert r["estimated"] > 100 * 2**20  # host.py's process alone is 0.52 GiB
    assert len(summary.peak_memory) == 2
    printed = console.file.getvalue()
    for phase in (WARM, RELORA):
        assert f"memory      {phase}: peak " in printed and "GiB of host RAM (peak RSS), estimated " in printed


class Lines:
    def __init__(self):
        self.lines, self.records = [], []

    def line(self, text):
        self.lines.append(text)

    def record(self, record):
        self.records.append(record)


def test_a_peak_more_than_10_percent_over_the_estimate_says_so_once_in_one_line(monkeypatch):
    recipe = tiny_recipe(steps=10, warm_start=0)
    out = Lines()
    measured = {"memory": "host", "peak_rss": 3 * 2**30, "measured": 3 * 2**30}
    monkeypatch.setattr(peak, "measure", lambda device: dict(measured))
    monkeypatch.setattr(peak, "reset", lambda device: None)
    fine = PeakMemory(recipe, torch.device("cpu"), {RELORA: 2.9 * 2**30}, out)
    fine.record(2)
    assert out.lines == []  # 3.4% over: within what the estimate may miss
    tight = PeakMemory(recipe, torch.device("cpu"), {RELORA: 2.5 * 2**30}, out)
    tight.record(2)
    tight.record(4)
    assert len(out.lines) == 1 and "20% more than memory-estimate's 2.50" in out.lines[0]
    assert tight.summary() == ["ReLoRA: peak 3.00 GiB of host RAM (peak RSS), estimated 2.50"]
    unknown = PeakMemory(recipe, torch.device("cpu"), {}, out)  # no estimate (vocabulary unknown): no judgement
    unknown.record(2)
    assert len(out.lines) == 1 and unknown.summary() == ["ReLoRA: peak 3.00 GiB of host RAM (peak RSS)"]
    assert out.records[-1]["estimated"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible (CPU-only machine)")
def test_a_cuda_run_records_torchs_peaks_and_the_paged_bytes_beside_the_gpu_estimate(tmp_path):
    console = Console(file=io.StringIO(), width=200)
    summary = train(cuda_recipe(steps=8), tmp_path, reporter=Reporter(tmp_path / "metrics.jsonl", 8, console=console,
                                                                      live=False), estimate_peaks=phase_estimates)
    records = memory_records(tmp_path / "metrics.jsonl")
    assert {r["phase"] for r in records} == {WARM, RELORA}
    for r in records:
        assert r["memory"] == "gpu" and r["peak_reserved"] >= r["peak_allocated"] > 0
        assert r["measured"] == r["peak_allocated"] + r["paged"]
        assert r["estimated"] > 0
    # (this model's tensors are below bnb's paging threshold: "paged" is counted, here as 0)
    assert all("GiB of GPU (allocated + paged), estimated" in line for line in summary.peak_memory)
    assert "of GPU (allocated + paged), estimated" in console.file.getvalue()
