"""Peak resident memory of one phase of a process (Linux).

The kernel keeps each process's high-water mark of resident memory (VmHWM); writing 5 to
/proc/self/clear_refs resets it to the current RSS (Linux ≥ 4.0). So a phase's peak is exact, not
sampled: reset, run the phase, read VmHWM. Freed heap is handed back first (malloc_trim) so that
memory left over from an earlier phase does not hide this one's growth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{STATUS} has no {field} line: peak memory needs Linux")
    return int(match.group(1)) * 1024


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_bytes() -> int:
    """The most resident memory since the process started or since the last `start_phase()`."""
    return _status_bytes("VmHWM")


def start_phase() -> int:
    """Release what earlier phases freed, reset the high-water mark; returns the RSS now."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)  # glibc only
        if trim is not None:
            trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({exc})") from None
    return rss_bytes()
