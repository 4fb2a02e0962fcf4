"""sysmem: large tensors get their own mappings (glibc's mmap threshold pinned), so freeing one returns its memory;
each case in a fresh process, since the setting is process-wide."""

import subprocess
import sys

import pytest

from lean_relora import sysmem

# Free a 20 MiB tensor: glibc then raises its mmap threshold to 20 MiB, and a 10 MiB tensor made next comes from its
# heap, where it stays resident after being freed (until malloc_trim). Prints the bytes glibc holds in separate
# mappings while the 10 MiB tensor lives (mallinfo2's hblkhd, beyond what it held before).
SCRIPT = """
import ctypes, sys, torch
from lean_relora import sysmem
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "mapped":
    sysmem.map_large_allocations()
big = torch.ones(20 * 2**20 // 4)
del big
mapped = libc.mallinfo2().hblkhd
tensor = torch.ones(10 * 2**20 // 4)
print(libc.mallinfo2().hblkhd - mapped)
"""


def mapped_bytes_of_a_10_mib_tensor(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(sysmem._LIBC is None or not hasattr(sysmem._LIBC, "mallinfo2"), reason="needs glibc >= 2.33")
def test_a_large_tensor_gets_its_own_mapping_once_large_allocations_are_mapped():
    assert mapped_bytes_of_a_10_mib_tensor("default") == 0  # glibc's own choice: its heap, kept when freed
    assert mapped_bytes_of_a_10_mib_tensor("mapped") >= 10 * 2**20  # unmapped, so returned, when freed
