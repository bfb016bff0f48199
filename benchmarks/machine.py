"""The machine facts every benchmark prints beside its figures (machines differ by session)."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path


def cpu() -> str:
    """The CPU model (``/proc/cpuinfo``), e.g. ``AMD EPYC 7B13``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
