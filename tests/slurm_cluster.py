"""A real SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld, one slurmd per node) for the launcher
tests: real sbatch/srun/sacct, no mocks.

One node: slurmd in the root namespace, as a workstation. N > 1 nodes: each node is a network namespace with its own
address (tests/slurm_network.py) running its own `slurmd -N NAME` (NodeAddr in slurm.conf); the controller, slurmdbd,
MariaDB and munge stay in the root namespace, reached at the bridge's address, and the filesystem is shared.

CLI: `python -m tests.slurm_cluster up [--nodes N]|down|status` (what `.ci/slurm-up.sh` / `.ci/slurm-down.sh` call);
`session(nodes)`, behind the `slurm_cluster` fixtures, reuses a running cluster with enough nodes or starts one.
Needs root (apt, daemons, namespaces). Everything lives in STATE_DIR (one cluster per machine: the ports are fixed); clients
find it through SLURM_CONF. No systemd here, so the daemons run in the foreground as children in their own
sessions, and are stopped by their recorded PIDs.

Settings that matter (measured): without slurmdbd submitit cannot see a job that died without a result and
`results()` hangs; requeue took ~160 s until cred_expire=10, bf_interval/sched_interval=2 and KillWait=5.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests import slurm_network

STATE_DIR = Path(os.environ.get("MEGAVICTOR_SLURM_DIR", "/tmp/megavictor-slurm"))
CLUSTER = "megavictor"
ACCOUNT = "megavictor"
PARTITION = "debug"
PORTS = {"slurmctld": 6817, "slurmd": 6818, "slurmdbd": 6819, "mariadbd": 6820}
PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd", "mariadb-install-db"]
DB_PASSWORD = "megavictor-test"  # a throw-away database reachable only on 127.0.0.1
STOP_ORDER = ["slurmctld", "slurmdbd", "mariadbd", "munged"]  # after every slurmd-*


class ClusterError(RuntimeError):
    """SLURM could not be installed or started; the message carries the failing daemon's log."""


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def users(self) -> Path:
        """One file per pytest session using the cluster (so a shared machine's sessions do not stop it under
        each other)."""
        return self.root / "users"

    @property
    def auto(self) -> Path:
        """Present when a fixture (not `up`) started the cluster: the last fixture user then stops it."""
        return self.root / "started-by-fixture"


PATHS = Paths(STATE_DIR)


# --------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 here may not reap orphans, so kill(pid, 0) alone lies)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _pid(name: str) -> int | None:
    path = PATHS.pids / f"{name}.pid"
    return int(path.read_text()) if path.is_file() else None


def _spawn(name: str, argv: list[str], user: str | None = None) -> None:
    """Start a foreground daemon detached from our session, its output in log/<name>.out, its PID recorded."""
    out = open(PATHS.log / f"{name}.out", "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, SLURM_CONF=str(PATHS.conf)),
                            user=user, group=user, extra_groups=[] if user else None)
    out.close()
    (PATHS.pids / f"{name}.pid").write_text(str(proc.pid))


def _stop(name: str, timeout: float = 20) -> None:
    pid = _pid(name)
    if pid is not None and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    (PATHS.pids / f"{name}.pid").unlink(missing_ok=True)


def _tail(name: str, lines: int = 30) -> str:
    text = ""
    for path in sorted(PATHS.log.glob(f"{name}*")):
        text += f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
    return text or f"(no log for {name})"


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SLURM_CONF=str(PATHS.conf))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode:
        raise ClusterError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def _wait(what: str, ready: Callable[[], bool], daemon: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        pid = _pid(daemon)
        if pid is not None and not _alive(pid):
            break
        time.sleep(0.25)
    raise ClusterError(f"{what} not ready after {timeout:.0f} s (or {daemon} died):\n{_tail(daemon)}")


# --------------------------------------------------------------------------- install and configure


def install() -> None:
    """apt-get install the daemons unless they are all there (idempotent; ~25 s on a fresh machine)."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise ClusterError(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


@dataclass(frozen=True)
class Node:
    name: str
    addr: str
    netns: str | None  # None: the root namespace (the one-node cluster)


def _write_configs(host: str, nodes: list[Node], controller_addr: str) -> None:
    root = PATHS.root
    cpus = os.cpu_count() or 1
    ctld = host if controller_addr == "127.0.0.1" else f"{host}({controller_addr})"  # (addr): where nodes reach it
    node_lines = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs={cpus} State=UNKNOWN" for n in nodes)
    PATHS.conf.write_text(f"""\
ClusterName={CLUSTER}
SlurmctldHost={ctld}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmctldPort={PORTS['slurmctld']}
SlurmdPort={PORTS['slurmd']}
StateSaveLocation={root}/spool/ctld
SlurmdSpoolDir={root}/spool/d/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
KillWait=5
MinJobAge=3600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={controller_addr}
AccountingStoragePort={PORTS['slurmdbd']}
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
{node_lines}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    dbd = root / "etc" / "slurmdbd.conf"
    dbd.write_text(f"""\
AuthType=auth/munge
DbdHost=localhost
DbdPort={PORTS['slurmdbd']}
SlurmUser=root
PidFile={root}/run/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={PORTS['mariadbd']}
StorageUser=slurm
StoragePass={DB_PASSWORD}
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)  # slurmdbd refuses a readable config: it holds the database password


# --------------------------------------------------------------------------- daemons


def _start_munge() -> None:
    """Reuse a running munged (it serves the whole machine); else start one as the munge user."""
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    Path("/run/munge").mkdir(mode=0o755, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    _spawn("munged", ["munged", "--foreground"], user="munge")
    _wait("munged", lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")


def _start_mariadb() -> None:
    data, sock = PATHS.root / "mysql", PATHS.root / "run" / "mysqld.sock"
    data.mkdir()
    shutil.chown(data, "mysql", "mysql")
    shutil.chown(PATHS.root / "run", "mysql", "mysql")
    proc = subprocess.run(["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={data}",
                           "--auth-root-authentication-method=socket", "--skip-test-db"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise ClusterError(f"mariadb-install-db failed:\n{proc.stdout}{proc.stderr}")
    _spawn("mariadbd", ["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={data}", f"--socket={sock}",
                        f"--port={PORTS['mariadbd']}", "--bind-address=127.0.0.1", "--skip-log-bin",
                        "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900",
                        f"--log-error={PATHS.log / 'mariadbd.log'}"])
    client = ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root"]
    _wait("MariaDB", lambda: subprocess.run([*client, "-e", "SELECT 1"], capture_output=True).returncode == 0,
          "mariadbd")
    sql = (f"CREATE USER 'slurm'@'%' IDENTIFIED BY '{DB_PASSWORD}'; "
           "CREATE DATABASE slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%';")
    subprocess.run([*client, "-e", sql], check=True, capture_output=True)


def _nodes_idle(count: int) -> bool:
    proc = _run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
    return proc.returncode == 0 and proc.stdout.split() == ["idle"] * count


def _start_slurm(nodes: list[Node]) -> None:
    _spawn("slurmdbd", ["slurmdbd", "-D"])  # reads slurmdbd.conf beside $SLURM_CONF
    _wait("slurmdbd", lambda: _run(["sacctmgr", "-n", "list", "cluster"], check=False).returncode == 0, "slurmdbd")
    _run(["sacctmgr", "-i", "add", "cluster", CLUSTER])
    _spawn("slurmctld", ["slurmctld", "-D", "-f", str(PATHS.conf)])
    _wait("slurmctld", lambda: _run(["scontrol", "ping"], check=False).returncode == 0, "slurmctld")
    for node in nodes:
        (PATHS.root / "spool" / "d" / node.name).mkdir()
        argv = ["slurmd", "-D", "-f", str(PATHS.conf), "-N", node.name]
        _spawn(f"slurmd-{node.name}", slurm_network.on_node(node.netns, argv) if node.netns else argv)
    _wait(f"{len(nodes)} node(s) idle in sinfo", lambda: _nodes_idle(len(nodes)), "slurmd")
    _run(["sacctmgr", "-i", "add", "account", ACCOUNT, f"Cluster={CLUSTER}", "Description=tests", "Organization=ci"])
    _run(["sacctmgr", "-i", "add", "user", "root", f"Account={ACCOUNT}", f"Cluster={CLUSTER}"])
    assocs = _run(["sacctmgr", "-n", "-P", "list", "assoc", "format=cluster,account,user"]).stdout
    if f"{CLUSTER}|{ACCOUNT}|root" not in assocs:
        raise ClusterError(f"sacctmgr does not list {CLUSTER}/{ACCOUNT}/root:\n{assocs}")


# --------------------------------------------------------------------------- public API


def node_names() -> list[str]:
    """The nodes of the configured cluster, in slurm.conf order."""
    if not PATHS.conf.is_file():
        return []
    return [line.split()[0].removeprefix("NodeName=") for line in PATHS.conf.read_text().splitlines()
            if line.startswith("NodeName=")]


def _daemons() -> list[str]:
    return ["slurmdbd", "slurmctld", "mariadbd", *(f"slurmd-{n}" for n in node_names())]


def is_up() -> bool:
    """All recorded SLURM daemons alive and the nodes idle or busy (answering sinfo)."""
    if not PATHS.conf.is_file() or not all((p := _pid(d)) is not None and _alive(p) for d in _daemons()):
        return False
    proc = _run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
    return proc.returncode == 0 and bool(proc.stdout.split())


def up(nodes: int = 1, exact: bool = True) -> float:
    """Install if needed and start an N-node cluster unless one is up (with exactly N nodes, or with `exact` False
    at least N); returns the seconds spent starting (0 if up)."""
    if is_up() and (len(node_names()) == nodes or not exact and len(node_names()) >= nodes):
        return 0.0
    if os.geteuid() != 0:
        raise ClusterError("starting SLURM needs root (apt-get, munged, slurmd, ip netns)")
    t0 = time.monotonic()
    install()
    down()  # whatever is left of a half-started cluster, or one of another size
    shutil.rmtree(PATHS.root, ignore_errors=True)
    for sub in ("etc", "log", "pids", "run", "users", "spool/ctld", "spool/d"):
        (PATHS.root / sub).mkdir(parents=True)
    host = socket.gethostname()
    try:
        if nodes == 1:
            cluster, controller_addr = [Node(host, "127.0.0.1", None)], "127.0.0.1"
        else:
            cluster = [Node(name, addr, name) for name, addr in slurm_network.up(nodes)]
            controller_addr = slurm_network.CONTROLLER_ADDR
        _write_configs(host, cluster, controller_addr)
        _start_munge()
        _start_mariadb()
        _start_slurm(cluster)
    except BaseException:
        down()  # leave no half-started daemons or namespaces behind; the logs stay in STATE_DIR/log
        raise
    return time.monotonic() - t0


def down() -> None:
    """Cancel every job, stop the daemons this module started (by recorded PID; munged only if ours), then remove
    the nodes' namespaces, links and /etc/hosts entries."""
    if PATHS.conf.is_file() and (pid := _pid("slurmctld")) is not None and _alive(pid):
        jobs = _run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if jobs:
            _run(["scancel", *jobs], check=False)
            deadline = time.monotonic() + 15
            while _run(["squeue", "-h", "-o", "%i"], check=False).stdout.split() and time.monotonic() < deadline:
                time.sleep(0.5)
    slurmds = sorted(p.stem for p in PATHS.pids.glob("slurmd*.pid")) if PATHS.pids.is_dir() else []
    for name in [*slurmds, *STOP_ORDER]:
        _stop(name)
    slurm_network.down()
    PATHS.auto.unlink(missing_ok=True)


def sacct_state(job_id: str, timeout: float = 60) -> str:
    """The job's accounting state once SLURM is done with it: squeue no longer lists it (its processes are gone)
    and slurmdbd has recorded the end (that lags squeue by a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        queued = _run(["squeue", "-h", "-j", job_id]).stdout
        state = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"]).stdout.strip()
        if not queued.strip() and state.split(" ")[0] not in ("", "PENDING", "RUNNING", "REQUEUED"):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {state}")
        time.sleep(0.5)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise start/stop between concurrent pytest sessions on a shared machine."""
    STATE_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR.parent / f"{STATE_DIR.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def session(nodes: int = 1) -> Iterator[Paths]:
    """Use the running cluster if it has at least `nodes` nodes, or start one; a cluster a session started goes down
    with its last user. Restarting a smaller cluster that other sessions use would kill their jobs: that errors."""
    with _locked():
        others = [p.name for p in PATHS.users.glob("*") if _alive(int(p.name)) and int(p.name) != os.getpid()] \
            if PATHS.users.is_dir() else []
        if is_up() and len(node_names()) < nodes and others:
            raise ClusterError(f"the running {len(node_names())}-node test cluster is in use (pytest PIDs "
                               f"{', '.join(others)}); start {nodes} nodes with `bash .ci/slurm-up.sh --nodes "
                               f"{nodes}` when it is free")
        started = up(nodes, exact=False)
        if started:
            PATHS.auto.touch()
            print(f"\nslurm_cluster: started in {started:.1f} s", file=sys.stderr)
        me = PATHS.users / str(os.getpid())
        me.touch()
    os.environ["SLURM_CONF"] = str(PATHS.conf)
    try:
        yield PATHS
    finally:
        with _locked():
            me.unlink(missing_ok=True)
            others = [p for p in PATHS.users.glob("*") if _alive(int(p.name))]
            if PATHS.auto.exists() and not others:
                down()


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"] and (argv[1:] == [] or len(argv) == 3 and argv[1] == "--nodes" and argv[2].isdigit()
                               and int(argv[2]) >= 1):
        nodes = int(argv[2]) if len(argv) == 3 else 1
        with _locked():
            seconds = up(nodes)
        print(f"slurm up: {nodes} node(s) {', '.join(node_names())} ({seconds:.1f} s to start); "
              f"export SLURM_CONF={PATHS.conf}")
        return 0
    if argv == ["down"]:
        with _locked():
            down()
        if left := slurm_network.leftovers():
            print(f"slurm down, but left behind: {', '.join(left)}", file=sys.stderr)
            return 1
        print("slurm down")
        return 0
    if argv == ["status"]:
        print("up" if is_up() else "down")
        return 0 if is_up() else 1
    print("usage: python -m tests.slurm_cluster up [--nodes N]|down|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
