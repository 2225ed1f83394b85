"""A local Ray started by `orchestrator launch` listens on loopback only: its GCS, raylet, object
manager, agents and dashboard run code for whoever reaches them. Real Ray, real sockets."""
from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest

from orchestrator.config import RayConfig
from protocol.net import free_port

pytestmark = pytest.mark.slow

# Ray processes that must be up (and listening) before the check means anything
EXPECTED = {"gcs_server", "raylet", "ray::DashboardA", "ray::RuntimeEnv"}  # /proc names: 15 characters
WAIT = 120  # seconds: upper bound for Ray's agents to come up


def listening_sockets() -> dict[int, str]:
    """socket inode -> local IP of every listening TCP socket on this machine (/proc/net/tcp, tcp6)."""
    found = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # kernel byte order per word
            address = ipaddress.ip_address(words)
            found[int(fields[9])] = str(getattr(address, "ipv4_mapped", None) or address)
    return found


def process_tree(root: int) -> dict[int, str]:
    """pid -> name of ``root`` and every process below it."""
    parents, names = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        names[pid] = text[text.index("(") + 1:text.rindex(")")]
        parents[pid] = int(text[text.rindex(")") + 2:].split()[1])
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= below
        grew = bool(below)
    return {pid: names.get(pid, "?") for pid in tree}


def ray_listeners() -> list[tuple[str, str]]:
    """(local IP, process name) of every listening socket of this process and its children."""
    sockets, out = listening_sockets(), []
    for pid, name in process_tree(os.getpid()).items():
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        out += [(sockets[inode], name) for link in links if link.startswith("socket:[")
                and (inode := int(link[8:-1])) in sockets]
    return out


def test_a_local_ray_listens_on_loopback_only():
    import ray

    from orchestrator.launch import start_ray

    start_ray(RayConfig(dashboard_port=free_port()), log=lambda m: None)
    try:
        deadline = time.monotonic() + WAIT
        listeners = ray_listeners()
        while not {name for _, name in listeners} >= EXPECTED:  # polled: Ray's agents start after init returns
            assert time.monotonic() < deadline, f"Ray's processes did not come up: {listeners}"
            time.sleep(0.5)
            listeners = ray_listeners()
        exposed = [(ip, name) for ip, name in listeners if not ipaddress.ip_address(ip).is_loopback]
        assert exposed == [], f"Ray listens off loopback: {exposed}"
    finally:
        ray.shutdown()
