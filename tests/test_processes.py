"""PID → pod: cgroup parsing on literal /proc/<pid>/cgroup contents, and the resolver over a fake procfs."""

from __future__ import annotations

import os

import pytest

from collectors.processes import CgroupOwner, ProcessResolver, parse_cgroup
from collectors.simulated.procfs import write_fake_proc

UID = "1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d"
CID = "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081"
CID2 = "0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c3b2a1908f7e6d5c4b"

# Literal /proc/<pid>/cgroup contents, one per layout seen on real nodes (long lines split at "/" only;
# nothing is substituted into them).
CASES: list[tuple[str, str, CgroupOwner | None]] = [
    ("v2 systemd containerd burstable",
     ("0::/kubepods.slice/kubepods-burstable.slice/"
      "kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "cri-containerd-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, CID, "containerd")),
    ("v2 systemd containerd guaranteed",
     ("0::/kubepods.slice/kubepods-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "cri-containerd-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, CID, "containerd")),
    ("v2 systemd containerd besteffort",
     ("0::/kubepods.slice/kubepods-besteffort.slice/"
      "kubepods-besteffort-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "cri-containerd-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, CID, "containerd")),
    ("v2 systemd CRI-O",
     ("0::/kubepods.slice/kubepods-burstable.slice/"
      "kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "crio-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, CID, "crio")),
    ("v2 systemd CRI-O, process in a sub-cgroup of the container",
     ("0::/kubepods.slice/kubepods-burstable.slice/"
      "kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "crio-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope/container\n"),
     CgroupOwner(UID, CID, "crio")),
    ("v2 CRI-O conmon: in the pod, not a container",
     ("0::/kubepods.slice/kubepods-burstable.slice/"
      "kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "crio-conmon-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, "", "crio", monitor=True)),
    ("v1 systemd docker (cri-dockerd)",
     ("12:pids:/kubepods.slice/kubepods-besteffort.slice/"
      "kubepods-besteffort-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "docker-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"
      "11:memory:/kubepods.slice/kubepods-besteffort.slice/"
      "kubepods-besteffort-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "docker-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"
      "1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/"
      "kubepods-besteffort-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "docker-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, CID, "docker")),
    ("v1 cgroupfs burstable (containerd or docker)",
     ("12:hugetlb:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"
      "11:cpu,cpuacct:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"
      "10:memory:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"),
     CgroupOwner(UID, CID, "")),
    ("v1 cgroupfs guaranteed",
     ("4:devices:/kubepods/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"),
     CgroupOwner(UID, CID, "")),
    ("v1 cgroupfs besteffort CRI-O",
     ("7:cpuset:/kubepods/besteffort/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "crio-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"),
     CgroupOwner(UID, CID, "crio")),
    ("v1 hybrid: a controller stops at the pod, another names the container",
     ("5:cpuset:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d\n"
      "4:memory:/kubepods/burstable/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c3b2a1908f7e6d5c4b\n"
      "0::/\n"),
     CgroupOwner(UID, CID2, "")),
    ("relative to a cgroup namespace (v2, agent in its own namespace)",
     ("0::/../../kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "cri-containerd-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, CID, "containerd")),
    ("relative, cgroupfs",
     ("0::/../pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"),
     CgroupOwner(UID, CID, "")),
    ("kind: kubelet nested under a node container",
     ("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
      "kubelet-kubepods-besteffort-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/"
      "cri-containerd-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner(UID, CID, "containerd")),
    ("v1 docker-in-docker cgroupfs prefix",
     ("9:memory:/docker/0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c3b2a1908f7e6d5c4b/"
      "kubepods/besteffort/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/"
      "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"),
     CgroupOwner(UID, CID, "")),
    ("upper-case pod UID is normalised",
     ("0::/kubepods/burstable/pod1B2C3D4E-5F60-7A8B-9C0D-1E2F3A4B5C6D/"
      "a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081\n"),
     CgroupOwner(UID, CID, "")),
    ("static pod: UID is a 32-hex config hash",
     ("0::/kubepods.slice/kubepods-burstable.slice/"
      "kubepods-burstable-pod6f1e2d3c4b5a69788796a5b4c3d2e1f0.slice/"
      "cri-containerd-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"),
     CgroupOwner("6f1e2d3c4b5a69788796a5b4c3d2e1f0", CID, "containerd")),
    ("pod level only: a process placed in the pod slice itself",
     ("0::/kubepods.slice/kubepods-burstable.slice/"
      "kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice\n"),
     CgroupOwner(UID, "", "")),
    ("host process: a systemd service", "0::/system.slice/nvidia-persistenced.service\n", None),
    ("host process in a user session", "0::/user.slice/user-1000.slice/session-3.scope\n", None),
    ("docker container outside Kubernetes",
     ("0::/system.slice/"
      "docker-a3f1c0e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081.scope\n"), None),
    ("inside our own cgroup namespace", "0::/\n", None),
    ("QoS slice without a pod", "0::/kubepods.slice/kubepods-burstable.slice\n", None),
    ("empty file", "", None),
    ("garbage", "not a cgroup file\n", None),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_cgroup(text: str, expected: CgroupOwner | None) -> None:
    assert parse_cgroup(text) == expected


CONTAINERD = f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"


def test_resolver_reads_fake_proc(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    write_fake_proc(root, 4242, CONTAINERD, start_time=1000)
    write_fake_proc(root, 77, "0::/system.slice/sshd.service\n", start_time=5)
    r = ProcessResolver(procfs=root)
    assert r.owner(4242) == CgroupOwner(UID, CID, "containerd")
    assert r.owner(77) is None
    assert r.errors == 0


def test_resolver_missing_pid_is_none_and_counted(tmp_path: os.PathLike[str]) -> None:
    r = ProcessResolver(procfs=str(tmp_path))
    assert r.owner(999) is None
    assert r.owner(998) is None
    assert r.errors == 2


def test_resolver_cache_follows_pid_reuse(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    write_fake_proc(root, 4242, CONTAINERD, start_time=1000)
    r = ProcessResolver(procfs=root)
    assert r.owner(4242) == CgroupOwner(UID, CID, "containerd")

    # Same process (same start time): the cached answer stands even if the file is now unreadable.
    os.unlink(os.path.join(root, "4242", "cgroup"))
    assert r.owner(4242) == CgroupOwner(UID, CID, "containerd")

    # The PID is reused by a process of another pod: a new start time means a fresh read.
    other = "b" * 64
    write_fake_proc(root, 4242, f"0::/kubepods/besteffort/pod{UID.replace('1b2c', '9999')}/{other}\n",
                    start_time=2000)
    owner = r.owner(4242)
    assert owner is not None and owner.container_id == other and owner.pod_uid.startswith("9999")


def test_resolver_without_stat_does_not_cache(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    write_fake_proc(root, 10, CONTAINERD)
    r = ProcessResolver(procfs=root)
    assert r.owner(10) == CgroupOwner(UID, CID, "containerd")
    write_fake_proc(root, 10, "0::/system.slice/cron.service\n")
    assert r.owner(10) is None


def test_resolver_cache_is_bounded(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    for pid in range(1, 11):
        write_fake_proc(root, pid, CONTAINERD, start_time=pid)
    r = ProcessResolver(procfs=root, max_cache=4)
    for pid in range(1, 11):
        assert r.owner(pid) is not None
    assert len(r._cache) == 4


def test_resolver_on_real_proc_self() -> None:
    """The real /proc: our own process resolves without error (to a pod only when run inside one)."""
    if not os.path.exists("/proc/self/cgroup"):
        pytest.skip("no procfs")
    r = ProcessResolver()
    first = r.owner(os.getpid())
    assert r.owner(os.getpid()) == first
    assert r.errors == 0
