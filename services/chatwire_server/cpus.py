"""How many CPUs this process may really use: what the engine sizes its threads by.

`os.cpu_count()` counts the machine's cores. A container limited to 2 CPUs on a 64-core node, or a process
pinned to 2 cores, would start 64 llama.cpp threads that spin at every barrier and take turns on 2 cores:
replies then take many times longer. The usable count is the smaller of the CPU affinity mask and the cgroup's
CPU quota (rounded down, at least 1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota."""
    count = len(os.sched_getaffinity(0))  # never empty
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    return count if quota is None else min(count, max(1, math.floor(quota)))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs' worth of time per period the process's cgroups allow, the strictest of its own and its parents'
    (`cpu.max` in cgroup v2, `cpu.cfs_quota_us` over `cpu.cfs_period_us` in v1), or None without a limit."""
    quotas = []
    for group in _own_cgroups(cgroup_root, self_cgroup):
        v2 = group / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota != "max" and period:
                quotas.append(int(quota) / int(period))
        v1_quota, v1_period = group / "cpu.cfs_quota_us", group / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file() and (quota_us := int(v1_quota.read_text())) > 0:
            quotas.append(quota_us / int(v1_period.read_text()))
    return min(quotas, default=None)


def _own_cgroups(cgroup_root: Path, self_cgroup: Path) -> list[Path]:
    """The cgroup directories that limit this process: its own (as `self_cgroup` names them) and each parent up
    to the root (a limit set on a parent applies too)."""
    groups: list[Path] = []
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers and "cpu" not in controllers.split(","):
            continue  # v1: another controller's hierarchy
        base = cgroup_root / "cpu" if controllers and (cgroup_root / "cpu").is_dir() else cgroup_root
        group = base / path.lstrip("/")
        while True:
            groups.append(group)
            if group == base:
                break
            group = group.parent
    return groups or [cgroup_root]
