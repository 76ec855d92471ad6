"""The simulated node's procfs: one `/proc/<pid>/cgroup` (and optionally `stat`) per GPU process.

The real process resolver (`collectors/processes.py`) reads these files exactly as it reads
`/proc` on a node. The container IDs in the cgroup paths are the ones the simulated API server
reports in `containerStatuses[].containerID`, so the cgroup join and the API agree.
"""

from __future__ import annotations

import hashlib
import os


def container_id(pod_uid: str, container: str) -> str:
    """A stable 64-hex runtime ID per (pod, container), as containerd would assign one."""
    return hashlib.sha256(f"{pod_uid}/{container}".encode()).hexdigest()


def cgroup_line(pod_uid: str, container: str) -> str:
    """A cgroup v2 line as containerd with the systemd driver writes it."""
    uid = pod_uid.replace("-", "_")
    return (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/"
            f"cri-containerd-{container_id(pod_uid, container)}.scope\n")


def write_fake_proc(root: str, pid: int, cgroup_text: str, start_time: int | None = None) -> None:
    """Write `<root>/<pid>/cgroup` (and `stat` if start_time is given) for simulations and tests."""
    d = os.path.join(root, str(pid))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "cgroup"), "w", encoding="utf-8") as f:
        f.write(cgroup_text if cgroup_text.endswith("\n") else cgroup_text + "\n")
    if start_time is not None:
        # Fields 3..21 are zeros; field 22 is the start time.
        rest = " ".join(["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 30)
        with open(os.path.join(d, "stat"), "w", encoding="ascii") as f:
            f.write(f"{pid} (sim proc) {rest}\n")
    else:
        try:
            os.unlink(os.path.join(d, "stat"))
        except FileNotFoundError:
            pass
