"""Peak memory of one side of a memory row, in this fresh process:

    python benchmarks/peak_rss.py WORKLOAD SIDE      (WORKLOAD in rows.MEMORY_WORKLOADS, SIDE: ours | reference)

Prints one JSON line: {"peak_mib": peak RSS above the baseline, "baseline_mib": RSS once the inputs are
built, "result": what the measured step returned}.

A separate process per side, because the CPU allocator keeps freed pages and every earlier allocation of the
parent would hide the step's own peak. The peak is the kernel's high-water mark `VmHWM`, reset to the current
RSS (`/proc/self/clear_refs` "5", Linux >= 4.0) once the inputs are built and the heap pages freed while
building them are given back to the OS (else the step could reuse pages already counted in the baseline).
Not `getrusage().ru_maxrss`: it cannot be reset, and after fork + exec it also carries the high-water mark of
the process that started this one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_rows import MEMORY_WORKLOADS as PREDICT_WORKLOADS  # noqa: E402
from rows import MEMORY_WORKLOADS as BASE_WORKLOADS  # noqa: E402

MEMORY_WORKLOADS = {**BASE_WORKLOADS, **PREDICT_WORKLOADS}


def _status_kib(field: str) -> int:
    """A `VmRSS` / `VmHWM`-style field of /proc/self/status, in KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (peak memory needs Linux)")
    return int(match.group(1))


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`; a no-op elsewhere)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_kib() -> int:
    """The RSS high-water mark since the last `reset_peak`, in KiB."""
    return _status_kib("VmHWM")


def reset_peak() -> int:
    """Reset the RSS high-water mark to the current RSS; return that RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def main(argv: list[str]) -> int:
    name, side = argv
    step = MEMORY_WORKLOADS[name](side)  # builds the inputs: not measured
    gc.collect()
    release_free_heap()
    baseline = reset_peak()
    result = step()
    peak = peak_kib()
    print(json.dumps({"peak_mib": (peak - baseline) / 1024, "baseline_mib": baseline / 1024, "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
