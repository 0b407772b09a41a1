"""detect_memory_limits on fake /proc + /sys trees: v1 and v2, nesting, sentinels, env, junk."""

import os
from pathlib import Path

import pytest

from memsafe_dagster.memory import detect_memory_limits, parse_memory_size

GiB = 1024**3
MiB = 1024**2
V1_UNLIMITED = "9223372036854771712"


def make_tree(
    root: Path,
    cgroup: str,
    files: dict[str, str],
    *,
    mem_total_kb: int = 16 * 1024 * 1024,
    mem_available_kb: int = 12 * 1024 * 1024,
    mountinfo: str | None = None,
) -> str:
    """A fake root with /proc/self/cgroup, /proc/meminfo and the given /sys files."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {mem_total_kb} kB\nMemFree:        1000 kB\n"
        f"MemAvailable:   {mem_available_kb} kB\n"
    )
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text(mountinfo)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return str(root)


def v2_stat(inactive_file: int) -> str:
    return f"anon 1000\nfile 5000\nactive_file 100\ninactive_file {inactive_file}\n"


def v1_stat(inactive_file: int, hierarchical: str = V1_UNLIMITED) -> str:
    return (
        f"cache 100\nrss 100\nhierarchical_memory_limit {hierarchical}\n"
        f"total_inactive_file {inactive_file}\ntotal_active_file 10\n"
    )


def test_v2_nested_limit_on_ancestor(tmp_path: Path) -> None:
    base = "sys/fs/cgroup"
    root = make_tree(
        tmp_path,
        "0::/kubepods/pod1/ctr\n",
        {
            f"{base}/cgroup.controllers": "cpu memory pids\n",
            f"{base}/kubepods/memory.max": "max\n",
            f"{base}/kubepods/pod1/memory.max": str(512 * MiB),
            f"{base}/kubepods/pod1/memory.current": str(300 * MiB),
            f"{base}/kubepods/pod1/memory.stat": v2_stat(50 * MiB),
            f"{base}/kubepods/pod1/ctr/memory.max": "max\n",
            f"{base}/kubepods/pod1/ctr/memory.current": str(200 * MiB),
            f"{base}/kubepods/pod1/ctr/memory.stat": v2_stat(40 * MiB),
        },
    )
    limits = detect_memory_limits(env={}, root=root)
    assert limits.limit_bytes == 512 * MiB
    assert limits.source == "cgroup-v2"
    assert limits.cgroup_version == 2
    assert limits.cgroup_path.endswith("kubepods/pod1/ctr")
    assert [Path(c.path).name for c in limits.cgroup_limits] == ["pod1"]
    # Working set of the container: usage minus inactive file cache, as the kubelet counts it.
    assert limits.working_set_bytes() == 160 * MiB
    # Available is taken at the limited ancestor (siblings share it): 512 - (300 - 50).
    assert limits.available_bytes() == 262 * MiB


def test_v2_smallest_of_several_ancestors_binds(tmp_path: Path) -> None:
    base = "sys/fs/cgroup"
    root = make_tree(
        tmp_path,
        "0::/a/b/c\n",
        {
            f"{base}/cgroup.controllers": "memory\n",
            f"{base}/a/memory.max": str(1 * GiB),
            f"{base}/a/b/memory.max": str(2 * GiB),
            f"{base}/a/b/c/memory.max": str(3 * GiB),
        },
    )
    limits = detect_memory_limits(env={}, root=root)
    assert limits.limit_bytes == 1 * GiB
    assert limits.cgroup_limit_bytes == 1 * GiB
    assert len(limits.cgroup_limits) == 3
    assert Path(limits.describe().split("(")[-1].rstrip(")")).name == "a"


def test_v1_limit_on_parent(tmp_path: Path) -> None:
    base = "sys/fs/cgroup/memory"
    root = make_tree(
        tmp_path,
        "12:pids:/docker/abc\n4:memory:/docker/abc/job\n0::/\n",
        {
            f"{base}/memory.limit_in_bytes": V1_UNLIMITED,
            f"{base}/docker/memory.limit_in_bytes": V1_UNLIMITED,
            f"{base}/docker/abc/memory.limit_in_bytes": str(1 * GiB),
            f"{base}/docker/abc/job/memory.limit_in_bytes": V1_UNLIMITED,
            f"{base}/docker/abc/job/memory.usage_in_bytes": str(400 * MiB),
            f"{base}/docker/abc/job/memory.stat": v1_stat(100 * MiB),
        },
    )
    limits = detect_memory_limits(env={}, root=root)
    assert limits.limit_bytes == 1 * GiB
    assert limits.source == "cgroup-v1"
    assert limits.cgroup_version == 1
    assert limits.working_set_bytes() == 300 * MiB


def test_v1_hierarchical_limit_from_an_ancestor_outside_the_mount(tmp_path: Path) -> None:
    base = "sys/fs/cgroup/memory"
    root = make_tree(
        tmp_path,
        "4:memory:/\n",
        {
            f"{base}/memory.limit_in_bytes": V1_UNLIMITED,
            f"{base}/memory.stat": v1_stat(0, hierarchical=str(768 * MiB)),
        },
    )
    limits = detect_memory_limits(env={}, root=root)
    assert limits.limit_bytes == 768 * MiB
    assert limits.source == "cgroup-v1"


def test_unlimited_sentinels_fall_back_to_physical(tmp_path: Path) -> None:
    root_v1 = make_tree(
        tmp_path / "v1",
        "4:memory:/job\n",
        {
            "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
            "sys/fs/cgroup/memory/job/memory.limit_in_bytes": "9223372036854775807",
            "sys/fs/cgroup/memory/job/memory.stat": v1_stat(0),
        },
        mem_total_kb=8 * 1024 * 1024,
    )
    root_v2 = make_tree(
        tmp_path / "v2",
        "0::/job\n",
        {
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/job/memory.max": "max\n",
        },
        mem_total_kb=8 * 1024 * 1024,
    )
    for root in (root_v1, root_v2):
        limits = detect_memory_limits(env={}, root=root)
        assert limits.source == "physical"
        assert limits.limit_bytes == 8 * GiB
        assert limits.cgroup_limits == ()
        assert limits.available_bytes() == 12 * GiB  # the host's MemAvailable


@pytest.fixture
def capped_tree(tmp_path: Path) -> str:
    return make_tree(
        tmp_path,
        "0::/ctr\n",
        {
            "sys/fs/cgroup/cgroup.controllers": "memory\n",
            "sys/fs/cgroup/ctr/memory.max": str(2 * GiB),
            "sys/fs/cgroup/ctr/memory.current": str(500 * MiB),
            "sys/fs/cgroup/ctr/memory.stat": v2_stat(100 * MiB),
        },
    )


def test_env_smaller_than_cgroup_binds(capped_tree: str) -> None:
    limits = detect_memory_limits(env={"MEMSAFE_MEMORY_LIMIT": "1g"}, root=capped_tree)
    assert limits.limit_bytes == 1 * GiB
    assert limits.source == "env:MEMSAFE_MEMORY_LIMIT"
    # Usage under an env limit is the container's working set: 1024 - 400.
    assert limits.available_bytes() == 624 * MiB


def test_env_larger_than_cgroup_does_not_bind(capped_tree: str) -> None:
    limits = detect_memory_limits(env={"CONTAINER_MEMORY_LIMIT": "4Gi"}, root=capped_tree)
    assert limits.limit_bytes == 2 * GiB
    assert limits.source == "cgroup-v2"
    assert limits.env_limits == {"CONTAINER_MEMORY_LIMIT": 4 * GiB}


def test_env_equal_to_cgroup_leaves_the_cgroup_binding(capped_tree: str) -> None:
    limits = detect_memory_limits(env={"MEMSAFE_MEMORY_LIMIT": "2g"}, root=capped_tree)
    assert limits.source == "cgroup-v2"


def test_smallest_env_variable_binds(capped_tree: str) -> None:
    env = {"MEMSAFE_MEMORY_LIMIT": "1.5g", "CONTAINER_MEMORY_LIMIT": "512m"}
    limits = detect_memory_limits(env=env, root=capped_tree)
    assert limits.limit_bytes == 512 * MiB
    assert limits.source == "env:CONTAINER_MEMORY_LIMIT"


def test_env_limit_without_cgroup_uses_process_rss(tmp_path: Path) -> None:
    root = make_tree(tmp_path, "", {})
    limits = detect_memory_limits(env={"MEMSAFE_MEMORY_LIMIT": "1g"}, root=root)
    assert limits.cgroup_path is None
    assert limits.source == "env:MEMSAFE_MEMORY_LIMIT"
    assert limits.available_bytes(process_rss_bytes=300 * MiB) == 724 * MiB


def test_malformed_env_value_names_the_variable(capped_tree: str) -> None:
    with pytest.raises(ValueError, match=r"MEMSAFE_MEMORY_LIMIT.*'lots'"):
        detect_memory_limits(env={"MEMSAFE_MEMORY_LIMIT": "lots"}, root=capped_tree)
    with pytest.raises(ValueError, match=r"CONTAINER_MEMORY_LIMIT.*positive"):
        detect_memory_limits(env={"CONTAINER_MEMORY_LIMIT": "0"}, root=capped_tree)
    # An empty value is "not set", as shells and Kubernetes often pass it.
    assert detect_memory_limits(env={"MEMSAFE_MEMORY_LIMIT": " "}, root=capped_tree).source == (
        "cgroup-v2"
    )


def test_env_defaults_to_os_environ(capped_tree: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMSAFE_MEMORY_LIMIT", "256m")
    assert detect_memory_limits(root=capped_tree).limit_bytes == 256 * MiB


def test_malformed_and_unreadable_files_are_skipped(tmp_path: Path) -> None:
    base = "sys/fs/cgroup/memory"
    root = make_tree(
        tmp_path,
        "garbage line without colons\n4:memory:/a/b\n",
        {
            f"{base}/a/memory.limit_in_bytes": "not-a-number\n",
            f"{base}/a/b/memory.stat": "total_inactive_file twelve\n",
            f"{base}/a/b/memory.usage_in_bytes": "??",
        },
        mem_total_kb=4 * 1024 * 1024,
    )
    # A directory where a file should be: reading it fails with an OSError.
    os.makedirs(os.path.join(root, base, "a/b/memory.limit_in_bytes"))
    limits = detect_memory_limits(env={}, root=root)
    assert limits.source == "physical"
    assert limits.limit_bytes == 4 * GiB
    assert limits.working_set_bytes() is None
    assert limits.available_bytes() == 12 * GiB


def test_missing_proc_means_no_cgroup(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 1048576 kB\n")
    limits = detect_memory_limits(env={}, root=str(tmp_path))
    assert limits.cgroup_version is None
    assert limits.source == "physical"
    assert limits.limit_bytes == 1 * GiB


def test_mountinfo_maps_a_host_cgroup_path_onto_the_container_mount(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: /proc/self/cgroup shows the host path, and the
    # container's own cgroup is mounted at /sys/fs/cgroup/memory with that path as its root.
    mountinfo = (
        "30 25 0:26 / /proc rw - proc proc rw\n"
        "41 40 0:35 /docker/abc /sys/fs/cgroup/memory ro,nosuid master:17 - cgroup cgroup "
        "rw,memory\n"
    )
    root = make_tree(
        tmp_path,
        "4:memory:/docker/abc\n",
        {"sys/fs/cgroup/memory/memory.limit_in_bytes": str(3 * GiB)},
        mountinfo=mountinfo,
    )
    limits = detect_memory_limits(env={}, root=root)
    assert limits.cgroup_path == os.path.join(root, "sys/fs/cgroup/memory")
    assert limits.limit_bytes == 3 * GiB
    assert limits.source == "cgroup-v1"


def test_hybrid_host_prefers_the_v1_memory_controller(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        "4:memory:/job\n0::/job\n",
        {
            "sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(1 * GiB),
            "sys/fs/cgroup/unified/job/cgroup.procs": "",
        },
    )
    limits = detect_memory_limits(env={}, root=root)
    assert (limits.cgroup_version, limits.limit_bytes) == (1, 1 * GiB)


def test_to_dict_is_stable(capped_tree: str) -> None:
    doc = detect_memory_limits(env={"MEMSAFE_MEMORY_LIMIT": "1g"}, root=capped_tree).to_dict()
    assert set(doc) == {
        "limit_bytes",
        "limit_mb",
        "source",
        "physical_bytes",
        "cgroup_version",
        "cgroup_path",
        "cgroup_limit_bytes",
        "cgroup_limits",
        "env_limits",
    }
    assert doc["env_limits"] == {"MEMSAFE_MEMORY_LIMIT": GiB}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2g", 2 * GiB),
        ("2G", 2 * GiB),
        ("512m", 512 * MiB),
        ("512Mi", 512 * MiB),
        ("512MB", 512 * MiB),
        ("1.5GiB", int(1.5 * GiB)),
        ("1024k", MiB),
        (" 64 Mi ", 64 * MiB),
        ("4096", 4096),
        (2147483648, 2 * GiB),
        (1.5e9, 1_500_000_000),
    ],
)
def test_parse_memory_size(text: str | int, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "12 parsecs", "-5m", "1.2.3g", "g", True, None, -1])
def test_parse_memory_size_rejects_and_quotes(bad: object) -> None:
    with pytest.raises(ValueError, match=r"invalid memory size") as info:
        parse_memory_size(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
