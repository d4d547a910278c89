"""One line describing the machine a figure was measured on (benchmarks print it with their results)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """CPU model, cores (usable), load average, torch version and threads, GPU if any."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (f"{cpu_model()}; {os.cpu_count()} cores ({usable} usable); load average {load}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text
