"""The network of a multi-node test cluster on one machine: every node is a network namespace with its own address.

Node i (1..N) is the namespace `mvnode<i>`; a veth pair joins it to the bridge `mvbr0` in the root namespace. Inside
every node the interface is called `mvnet` and has 10.213.0.(10+i); the bridge holds 10.213.0.1, where the
controller, slurmdbd and munge (root namespace) are reached. The node names resolve on every node through a marked
block in /etc/hosts (the filesystem is shared, as on a cluster). A daemon runs on a node through `on_node()`
(`nsenter --net=...`), so it sees only that node's addresses; everything else (files, users, munge's socket) is
shared.

Only this module's names are touched: `down()` removes the namespaces `mvnode*`, the links `mvveth*` and `mvbr0`, and
its /etc/hosts block, and nothing else.
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

BRIDGE = "mvbr0"
NODE_PREFIX = "mvnode"
VETH_PREFIX = "mvveth"
INTERFACE = "mvnet"  # the node side of each veth pair: the same name on every node, as a cluster's eth0
SUBNET = ipaddress.ip_network("10.213.0.0/24")
CONTROLLER_ADDR = str(SUBNET[1])
HOSTS = Path("/etc/hosts")
HOSTS_BEGIN, HOSTS_END = "# megavictor test cluster: begin", "# megavictor test cluster: end"


class NetworkError(RuntimeError):
    """A namespace, link or address could not be set up; the message carries the failing `ip` command."""


def node_name(index: int) -> str:
    return f"{NODE_PREFIX}{index}"


def node_addr(index: int) -> str:
    return str(SUBNET[10 + index])


def on_node(node: str, argv: list[str]) -> list[str]:
    """`argv` run inside `node`'s network namespace (nsenter execs it: the PID stays the program's)."""
    return ["nsenter", f"--net=/run/netns/{node}", *argv]


def _ip(*args: str, node: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args] if node is None else ["ip", "-n", node, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode:
        raise NetworkError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _check_subnet_free() -> None:
    """Refuse to shadow a network the machine already uses (ours, left over, is removed by down() first)."""
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        iface, addr = fields[1], ipaddress.ip_interface(fields[3])
        if iface != BRIDGE and addr.network.overlaps(SUBNET):
            raise NetworkError(f"{SUBNET} is already used on {iface} ({addr}); the test cluster needs it")


def _write_hosts(entries: list[str]) -> None:
    """Replace our block in /etc/hosts (written in place: it may be a bind mount)."""
    lines = HOSTS.read_text().splitlines() if HOSTS.exists() else []
    if HOSTS_BEGIN in lines and HOSTS_END in lines:
        del lines[lines.index(HOSTS_BEGIN):lines.index(HOSTS_END) + 1]
    if entries:
        lines += [HOSTS_BEGIN, *entries, HOSTS_END]
    HOSTS.write_text("\n".join(lines) + "\n")


def up(nodes: int) -> list[tuple[str, str]]:
    """The bridge and `nodes` namespaces, each with lo and `mvnet` up; returns [(node name, address)]."""
    down()
    _check_subnet_free()
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{CONTROLLER_ADDR}/{SUBNET.prefixlen}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    made = []
    for i in range(1, nodes + 1):
        node, addr, veth = node_name(i), node_addr(i), f"{VETH_PREFIX}{i}"
        _ip("netns", "add", node)
        _ip("link", "add", veth, "type", "veth", "peer", "name", INTERFACE, "netns", node)
        _ip("link", "set", veth, "master", BRIDGE, "up")
        _ip("addr", "add", f"{addr}/{SUBNET.prefixlen}", "dev", INTERFACE, node=node)
        _ip("link", "set", INTERFACE, "up", node=node)
        _ip("link", "set", "lo", "up", node=node)
        made.append((node, addr))
    _write_hosts([f"{addr} {node}" for node, addr in made])
    return made


def down() -> None:
    """Remove every namespace, link and /etc/hosts entry of ours (idempotent)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(NODE_PREFIX):
            _ip("netns", "delete", name)  # its end of the veth pair goes with it, and so does ours
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(VETH_PREFIX) or name == BRIDGE:
            proc = _ip("link", "delete", name, check=False)
            # A veth goes with its namespace's end, asynchronously: listed above, it may be gone by now (seen once
            # in CI, failing the run after every test had passed). `leftovers()` checks that nothing remains.
            if proc.returncode and "Cannot find device" not in proc.stderr:
                raise NetworkError(f"ip link delete {name} exited {proc.returncode}: {proc.stderr.strip()}")
    _write_hosts([])


def leftovers() -> list[str]:
    """Whatever of ours is still there (empty after down())."""
    found = [f"netns {line.split()[0]}" for line in _ip("netns", "list", check=False).stdout.splitlines()
             if line.startswith(NODE_PREFIX)]
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(VETH_PREFIX) or name == BRIDGE:
            found.append(f"link {name}")
    if HOSTS.exists() and HOSTS_BEGIN in HOSTS.read_text():
        found.append(f"{HOSTS} block")
    return found
