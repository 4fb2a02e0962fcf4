"""host: freed tensors go back to the system (glibc's mmap threshold pinned), in a fresh process each time."""

import subprocess
import sys

import pytest

from lean_relora import host

# Free a 20 MiB tensor (glibc then raises its mmap threshold to 20 MiB), then make 16 tensors of 10 MiB and a small
# one after them, free the 16 and keep the small one: from glibc's heap, some of the 160 MiB stay, below a live block.
SCRIPT = """
import sys, torch
from lean_relora import host
if sys.argv[1] == "mapped":
    host.map_large_allocations()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
big = torch.ones(20 * 2**20 // 4)
del big
base = rss()
tensors = [torch.ones(10 * 2**20 // 4) for _ in range(16)]
keep = torch.ones(64 * 1024)
del tensors
print(rss() - base)
"""


def held_after_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(host._LIBC is None, reason="needs glibc (mallopt)")
def test_freed_tensors_are_returned_to_the_system_once_large_allocations_are_mapped():
    assert held_after_free("default") > 32 * 2**20  # glibc's own behaviour: freed tensors stay resident
    assert held_after_free("mapped") < 8 * 2**20
