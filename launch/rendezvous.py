"""Where a job's tasks meet: the torch.distributed rendezvous (MASTER_ADDR, MASTER_PORT) and the network interface
gloo/NCCL bind to, worked out on every task from the job itself, so that it holds on any node and after a requeue
onto other nodes.

- MASTER_ADDR: the first host of the job's node list as SLURM expands it (`scontrol show hostnames`), where global
  rank 0 runs (submitit's `--cluster local`: this host).
- MASTER_PORT: the submitting shell's MASTER_PORT, else one derived from the job id (the same on every task and every
  requeue) in 20000-31999, below Linux's ephemeral range (32768-60999), where any process's client socket may sit;
  rank 0 checks that it is free on its node and fails at once, naming it, if not.
- The socket interface: `--network-interface` sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME; else the ones in the
  submitting shell's environment pass through (sbatch exports it); else GLOO_SOCKET_IFNAME is the interface of this
  node's route to MASTER_ADDR. Gloo's own default is the address the host name resolves to, which on many machines
  (and in tests/slurm_network.py's cluster) is 127.0.0.1: peers on other nodes are then told to connect to their own
  loopback and the job hangs. NCCL keeps its own choice (it skips lo and docker and prefers InfiniBand) unless told.
"""

from __future__ import annotations

import os
import socket
import subprocess
import zlib
from dataclasses import dataclass

import psutil
import submitit

PORT_RANGE = (20000, 32000)
INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class RendezvousError(RuntimeError):
    """The job's tasks cannot meet as configured; the message names the host, address, port or interface."""


@dataclass(frozen=True)
class Rendezvous:
    """What this task exported, and why (for the header of its log)."""

    master_addr: str
    master_port: int
    host: str  # this task's node (SLURM's name for it)
    address: str  # this node's address on the route to the master
    interfaces: dict[str, str]  # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME -> "eth0 (detected)" / "(NCCL's choice)"


def master_port(job_id: str) -> int:
    """A rendezvous port fixed per job (the same for every task and every requeue), below the ephemeral range."""
    low, high = PORT_RANGE
    return low + zlib.crc32(job_id.encode()) % (high - low)


def job_hosts(job_env: submitit.JobEnvironment) -> list[str]:
    """The job's nodes in SLURM's order (rank 0 runs on the first)."""
    if job_env.cluster != "slurm":
        return list(job_env.hostnames)
    proc = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode or not proc.stdout.split():
        raise RendezvousError(f"scontrol show hostnames {os.environ['SLURM_JOB_NODELIST']!r} failed: "
                              f"{proc.stderr.strip()}")
    return proc.stdout.split()


def route_to(addr: str) -> tuple[str, str]:
    """(this host's source address towards `addr`, the interface holding it), from the kernel's routing table: a UDP
    connect() sends nothing. For an address of this host, the interface that has it (not lo, which the kernel uses
    to deliver it)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        source = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == source for a in addrs):
            return source, name
    raise RendezvousError(f"no interface holds {source}, this host's address towards {addr}")


def _check_port_free(port: int, host: str) -> None:
    """Bind it as TCPStore will (SO_REUSEADDR: a requeued job's old connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise RendezvousError(f"rendezvous port {port} on {host} is taken ({e.strerror}): resubmit with "
                                  f"MASTER_PORT set to a free port in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1}") from e


def setup(job_env: submitit.JobEnvironment, network_interface: str | None) -> Rendezvous:
    """Export torch.distributed's environment (env:// init) and the socket interface(s) for this task; returns
    what it chose."""
    hosts = job_hosts(job_env)
    master = hosts[0]
    port = int(os.environ.get("MASTER_PORT") or master_port(job_env.job_id))
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        master_ip = socket.getaddrinfo(master, port, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        raise RendezvousError(f"{host}: cannot resolve the master node {master!r} ({e.strerror})") from e
    address, interface = route_to(master_ip)
    if job_env.global_rank == 0:
        _check_port_free(port, host)
    interfaces = {}
    for var in INTERFACE_VARS:
        if network_interface:
            os.environ[var] = network_interface
            interfaces[var] = f"{network_interface} (--network-interface)"
        elif os.environ.get(var):
            interfaces[var] = f"{os.environ[var]} (environment)"
        elif var == "GLOO_SOCKET_IFNAME":
            if interface == "lo" and len(hosts) > 1:
                raise RendezvousError(f"{host}: the master node {master} resolves to {master_ip}, a loopback "
                                      f"address, in a {len(hosts)}-node job: fix its name resolution or pass "
                                      "--network-interface")
            os.environ[var] = interface
            interfaces[var] = f"{interface} (route to {master_ip})"
        else:
            interfaces[var] = "(NCCL's own choice)"
    os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(job_env.global_rank),
                      WORLD_SIZE=str(job_env.num_tasks), LOCAL_RANK=str(job_env.local_rank),
                      LOCAL_WORLD_SIZE=str(job_env.num_tasks // job_env.num_nodes))
    return Rendezvous(master, port, host, address, interfaces)


def header(job_env: submitit.JobEnvironment, rdv: Rendezvous) -> str:
    """The first line of every rank's log: which rank runs where, and how it meets the others."""
    ifaces = ", ".join(f"{k}={v}" for k, v in rdv.interfaces.items())
    return (f"megavictor launch: job {job_env.job_id} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}: "
            f"rank {job_env.global_rank}/{job_env.num_tasks} (local {job_env.local_rank}) on host {rdv.host} "
            f"({rdv.address}); rendezvous {rdv.master_addr}:{rdv.master_port}; {ifaces}")
