"""Keep freed memory in the process (glibc), so a CPU training step stops paying for fresh pages.

glibc's malloc serves large blocks (128 KiB and up, a threshold it raises as such blocks are freed)
with mmap and returns them to the kernel on free, and it trims the heap's free top back to the kernel
too. A CPU training step allocates and frees its activations dozens of times, so every step faulted
in freshly zeroed pages for them (docs/performance.md has the counts and the time it cost). With the
mmap threshold at its ceiling and trimming off, freed blocks are reused instead: the same arithmetic,
on memory already mapped. PyTorch's CPU tuning
guide gets this by preloading jemalloc or tcmalloc, which needs a system library and an environment
variable set before Python starts; glibc's own ``mallopt`` does it from inside the process.
"""

import ctypes
import platform

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses a larger mmap threshold: 4 MiB * sizeof(long) on 64-bit. Bigger blocks still come from
# mmap and go back on free, so a one-off large buffer (a whole dataset) does not stay resident.
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
NEVER = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for a training process; returns whether it took (False off glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # Order matters: either call turns off the dynamic threshold, and a trim setting alone would leave
    # the mmap threshold at its 128 KiB start, sending every activation to mmap.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER))
