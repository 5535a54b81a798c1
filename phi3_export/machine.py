"""A description of the machine a measurement ran on: speed figures only compare within one."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem / 2**30, 1), "os": platform.system(),
            "python": platform.python_version()}
