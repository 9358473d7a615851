"""An emulated multi-host cluster on one machine, for the multi-node tests (needs root).

Each host is a network namespace ``<prefix><host>`` plus a persistent UTS namespace (its own
``hostname``, hence its own ``MPI_Get_processor_name``) and ``/etc/netns/<prefix><host>/hosts``
naming every host. Every host has one interface, ``eth0``, with an address from 198.18.0.0/24
(a benchmarking test range that exists only inside these namespaces); the other ends of the veth
pairs sit on a bridge in a separate namespace ``<prefix>switch``, so nothing is added to the
machine's own namespace. The prefix is ``dpc-`` for the command line's cluster and
``dpc<pid>-`` for a test's (:meth:`Cluster.private`), so two test runs on one machine never
touch each other's hosts; a private cluster whose process died is removed by the next one.
``tc tbf`` on each ``eth0`` emulates a slower link. Each host also has
its own directory under ``<state>/disk/<host>``: ``hostexec`` mounts it over ``$DPC_PRIVATE`` to
give a host its own "local disk".

Commands run on a host through ``tests/cluster/hostexec HOST CMD...``, which is also the ssh
stand-in for MPICH's Hydra and Open MPI. Command line::

    python tests/cluster/netcluster.py up [--hosts hosta,hostb] [--rate 1gbit]
    python tests/cluster/netcluster.py rate 100mbit      # or "none"
    python tests/cluster/netcluster.py counters          # bytes sent/received per host's eth0
    python tests/cluster/netcluster.py down
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOSTEXEC = HERE / "hostexec"
STATE = Path(os.environ.get("DPC_STATE", "/run/distprop-cluster"))
PREFIX = "dpc-"
SUBNET = "198.18.0"
DEFAULT_HOSTS = ("hosta", "hostb")
TOOLS = ("ip", "nsenter", "unshare", "tc", "mount")


def missing_requirements() -> str | None:
    """Why the cluster cannot be built here (a one-line reason), or None when it can."""
    if os.geteuid() != 0:
        return "the test cluster needs root (network and UTS namespaces)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"the test cluster needs {', '.join(missing)} on PATH"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def address(index: int) -> str:
    """The address of the index-th host (0-based)."""
    return f"{SUBNET}.{10 + index}"


class Cluster:
    """The emulated hosts: ``up()`` builds them, ``down()`` removes everything ``up`` made."""

    def __init__(self, hosts=DEFAULT_HOSTS, state: Path = STATE, prefix: str = PREFIX):
        self.hosts = list(hosts)
        self.state = Path(state)
        self.prefix = prefix
        self.switch = f"{prefix}switch"

    @classmethod
    def private(cls, hosts=DEFAULT_HOSTS) -> Cluster:
        """A cluster of this process's own (namespaces ``dpc<pid>-*``, state under
        ``/run/distprop-cluster-<pid>``); first removes private clusters whose process died."""
        for stale in STATE.parent.glob(f"{STATE.name}-*"):
            owner = stale.name.rsplit("-", 1)[-1]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                cls._from_state(stale).down()
        pid = os.getpid()
        return cls(hosts, STATE.parent / f"{STATE.name}-{pid}", f"dpc{pid}-")

    @classmethod
    def _from_state(cls, state: Path) -> Cluster:
        listed, prefix = state / "hosts", state / "prefix"
        hosts = listed.read_text().strip().split(",") if listed.exists() else []
        return cls(hosts, state, prefix.read_text().strip() if prefix.exists() else PREFIX)

    def netns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    # -- building and tearing down ----------------------------------------------------------

    def up(self, rate: str | None = None) -> Cluster:
        """Build the hosts (tearing down leftovers of an earlier run first)."""
        self.down()
        try:
            self._build()
            if rate:
                self.set_rate(rate)
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "hosts").write_text(",".join(self.hosts) + "\n")
        (self.state / "prefix").write_text(self.prefix + "\n")  # read by hostexec
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{address(i)} {h}\n" for i, h in enumerate(self.hosts))
        for i, host in enumerate(self.hosts):
            ns = self.netns(host)
            _sh("ip", "netns", "add", ns)
            # veth pair created inside the host's namespace, peer moved to the switch: the
            # machine's own namespace never holds either end.
            _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", host,
                "netns", self.switch)
            _sh("ip", "-n", self.switch, "link", "set", host, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
            uts = self.state / f"{host}.uts"
            uts.touch()
            _sh("unshare", f"--uts={uts}", "hostname", host)
            (self.state / "disk" / host).mkdir(parents=True, exist_ok=True)

    def down(self) -> None:
        """Remove every namespace, mount and file ``up`` made (also after a partial ``up``)."""
        hosts = set(self.hosts)
        listed = self.state / "hosts"
        if listed.exists():
            hosts.update(h for h in listed.read_text().strip().split(",") if h)
        for host in sorted(hosts):
            uts = self.state / f"{host}.uts"
            if uts.exists():
                _sh("umount", str(uts), check=False)
            _sh("ip", "netns", "del", self.netns(host), check=False)
            shutil.rmtree(Path("/etc/netns") / self.netns(host), ignore_errors=True)
        _sh("ip", "netns", "del", self.switch, check=False)
        if self.state.exists():
            shutil.rmtree(self.state, ignore_errors=True)

    # -- links ------------------------------------------------------------------------------

    def set_rate(self, rate: str | None) -> None:
        """Limit every host's outgoing eth0 traffic to ``rate`` (tc syntax, e.g. ``1gbit``);
        None or "none" removes the limit."""
        for host in self.hosts:
            ns = self.netns(host)
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
                check=False)
            if rate and rate != "none":
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                    "rate", rate, "burst", "256kb", "latency", "50ms")

    def counters(self) -> dict[str, tuple[int, int]]:
        """Bytes (sent, received) on each host's eth0 so far."""
        out = {}
        for host in self.hosts:
            base = "/sys/class/net/eth0/statistics/"
            text = self.run(host, ["cat", base + "tx_bytes", base + "rx_bytes"],
                            timeout=10).stdout.split()
            out[host] = (int(text[0]), int(text[1]))
        return out

    # -- running ----------------------------------------------------------------------------

    def command(self, host: str, argv) -> list[str]:
        """The argv that runs ``argv`` on ``host``."""
        return [str(HOSTEXEC), host, "--", *map(str, argv)]

    def run(self, host: str, argv, timeout: float = 120, env=None, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host``; returns the CompletedProcess (text, output captured)."""
        full = dict(os.environ, DPC_STATE=str(self.state))
        full.update(env or {})
        proc = subprocess.run(self.command(host, argv), capture_output=True, text=True,
                              timeout=timeout, env=full, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"on {host}: {' '.join(map(str, argv))} exited "
                               f"{proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def mpi_env(self, interface: str = "eth0") -> dict[str, str]:
        """Environment that sends MPICH's (Hydra's) proxies through ``hostexec`` and its traffic
        over TCP on ``interface`` (the wheel's default UCX netmod would use shared memory between
        the namespaces, so nothing would cross the emulated link)."""
        return {
            "DPC_STATE": str(self.state),
            "HYDRA_LAUNCHER": "ssh",
            "HYDRA_LAUNCHER_EXEC": str(HOSTEXEC),
            "HYDRA_LAUNCHER_AUTOFORK": "0",
            "HYDRA_IFACE": interface,
            "MPIR_CVAR_CH4_NETMOD": "ofi",
            "FI_PROVIDER": "tcp",
            "FI_TCP_IFACE": interface,
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--hosts", default=",".join(DEFAULT_HOSTS))
    p_up.add_argument("--rate", default=None)
    p_rate = sub.add_parser("rate")
    p_rate.add_argument("rate")
    sub.add_parser("counters")
    sub.add_parser("down")
    args = parser.parse_args(argv)
    reason = missing_requirements()
    if reason:
        print(f"netcluster: {reason}", file=sys.stderr)
        return 2
    listed = STATE / "hosts"
    hosts = (args.hosts.split(",") if args.cmd == "up" else
             listed.read_text().strip().split(",") if listed.exists() else list(DEFAULT_HOSTS))
    cluster = Cluster(hosts)
    if args.cmd == "up":
        cluster.up(args.rate)
        print(" ".join(f"{h}={address(i)}" for i, h in enumerate(hosts)))
    elif args.cmd == "rate":
        cluster.set_rate(args.rate)
    elif args.cmd == "counters":
        for host, (tx, rx) in cluster.counters().items():
            print(f"{host} tx={tx} rx={rx}")
    else:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
