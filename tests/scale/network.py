"""Capped hosts for the scalability benchmark: one Linux network namespace per host.

:class:`CappedNetwork` (root only) builds, for one benchmark run::

    root namespace:  bridge tscb<tag>  10.x.y.(n+1)/28   <- the benchmark's clients (uncapped)
                       |-- veth tsc<tag>h<i>  <->  eth0 in namespace tsc<tag>-<host>
    namespace tsc<tag>-<host>:  lo, eth0 10.x.y.(n+2+i)/28, no default route

A capped host gets a ``tc tbf`` qdisc on both ends of its veth pair: on ``eth0``
inside its namespace (what the host sends) and on the bridge-side end in the root
namespace (what it receives). Both directions are therefore limited to ``rate_mbit``,
whoever the peer is (a client, the coordinator, another broker replicating). Uncapped
hosts (the coordinator) and the bridge itself run at memory speed.

The approach is the fault harness's (tests/fault/harness/network.py), copied rather
than imported so the two can change apart: ``tag`` is the creating process's PID (so
parallel runs never share a name), the /28 is derived from it and skipped when any
route of the machine overlaps it, namespaces have no default route and the root
namespace's ``ip_forward`` is checked unchanged, so no packet leaves this machine.
``destroy()`` deletes every namespace (taking its veth pair along) and the bridge; it
is idempotent and tolerates half-built states. :func:`sweep_stale` removes what a
killed earlier run left behind (only names whose PID is dead).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

PREFIX = "tsc"
_COMMAND_TIMEOUT_S = 20.0
# tbf drops a packet larger than its bucket; veth hands over GSO packets of up to
# 64 KiB, so the bucket holds at least that much.
BURST_BYTES = 96 * 1024
QUEUE_LATENCY_MS = 100


class NetworkError(Exception):
    """A setup command failed; the message holds its output."""


class _Stop:
    held = 0  # signals_held() depth
    pending: int | None = None  # a stop signal that came while held
    raised = False  # the stop was raised: the run is unwinding through its cleanup


def stop_on_signal(signum: int, frame: FrameType | None) -> None:
    """The benchmark's SIGTERM/SIGINT handler: unwinds like Ctrl-C (every ``finally``
    runs), except while :func:`signals_held`, which raises it on leaving. Only the
    first stop is raised: a second one (an impatient caller) must not cut the cleanup
    of the first short, which would leave namespaces and processes behind."""
    if _Stop.raised:
        return
    if _Stop.held:
        _Stop.pending = signum
        return
    _Stop.raised = True
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def signals_held() -> Iterator[None]:
    """Around a child's start and its bookkeeping (an ``ip`` command, a ``Popen`` and
    the list that remembers it): a KeyboardInterrupt raised inside ``Popen`` would lose
    a child that already runs (nothing would kill it or delete what it made). The stop
    is raised when the outermost hold ends."""
    _Stop.held += 1
    try:
        yield
    finally:
        _Stop.held -= 1
        if not _Stop.held and _Stop.pending is not None and not _Stop.raised:
            signum, _Stop.pending = _Stop.pending, None
            _Stop.raised = True
            raise KeyboardInterrupt(f"signal {signum}")


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    with signals_held():
        completed = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    if check and completed.returncode != 0:
        raise NetworkError(
            f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr.strip()}"
        )
    return completed


def namespaces_available() -> tuple[bool, str]:
    """(True, "") when this process can build capped namespaces, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"{tool} not installed (Debian package iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:  # the add too: a SIGTERM during it still deletes what it made
        created = _run(["ip", "netns", "add", probe], check=False)
        if created.returncode != 0:
            return False, f"ip netns add failed: {created.stderr.strip()}"
        inside = ["ip", "netns", "exec", probe]
        _run([*inside, "ip", "link", "set", "lo", "up"], check=False)
        tbf = _run([*inside, *tbf_argv("lo", 10)], check=False)
        if tbf.returncode != 0:
            return False, f"tc tbf unusable: {tbf.stderr.strip()}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return True, ""


def tbf_argv(device: str, rate_mbit: float) -> list[str]:
    return [
        "tc", "qdisc", "replace", "dev", device, "root", "tbf",
        "rate", f"{rate_mbit}mbit", "burst", str(BURST_BYTES), "latency", f"{QUEUE_LATENCY_MS}ms",
    ]  # fmt: skip


def _routes_overlap(subnet: ipaddress.IPv4Network) -> bool:
    routes = _run(["ip", "-4", "route", "show", "table", "all"]).stdout
    for line in routes.splitlines():
        words = line.split()
        destination = words[0] if words else ""
        if destination in ("default", "broadcast", "local", "unreachable", "multicast"):
            destination = words[1] if len(words) > 1 else ""
        try:
            network = ipaddress.ip_network(destination, strict=False)
        except ValueError:
            continue
        if (
            isinstance(network, ipaddress.IPv4Network)
            and network.prefixlen > 0
            and network.overlaps(subnet)
        ):
            return True
    return False


def choose_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /28 in 10.0.0.0/8 that no route of this machine touches, starting at ``seed``."""
    for attempt in range(256):
        # Offset from the fault harness's sequence, so the two rarely even try the same.
        index = (seed + 524_287 + attempt * 7919) % (1 << 20)
        subnet = ipaddress.ip_network(
            f"10.{index >> 12}.{(index >> 4) & 255}.{(index & 15) << 4}/28"
        )
        if isinstance(subnet, ipaddress.IPv4Network) and not _routes_overlap(subnet):
            return subnet
    raise NetworkError("no free 10.x /28 subnet found for the benchmark network")


def sweep_stale() -> list[str]:
    """Deletes namespaces and bridges named tsc<pid>... whose pid is dead; returns them."""
    removed: list[str] = []
    pattern = re.compile(rf"^{PREFIX}b?(\d+)")

    def dead(name: str) -> bool:
        match = pattern.match(name)
        if match is None:
            return False
        pid = int(match.group(1))
        return pid != os.getpid() and not os.path.exists(f"/proc/{pid}")

    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if dead(name):
            _run(["ip", "netns", "delete", name], check=False)
            removed.append(name)
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if dead(name):
            _run(["ip", "link", "delete", name], check=False)
            removed.append(name)
    return removed


class CappedNetwork:
    """One namespace per host on a private bridge, capped hosts behind tbf both ways."""

    def __init__(
        self,
        hosts: Sequence[str],
        capped: Sequence[str],
        rate_mbit: float,
        tag: str | None = None,
    ) -> None:
        if rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be positive, not {rate_mbit}")
        unknown = set(capped) - set(hosts)
        if unknown:
            raise ValueError(f"capped hosts {sorted(unknown)} are not among {list(hosts)}")
        self.tag = tag or str(os.getpid())
        self.hosts = list(hosts)
        self.capped = list(capped)
        self.rate_mbit = rate_mbit
        self.bridge = f"{PREFIX}b{self.tag}"
        self.subnet = choose_subnet(int(self.tag))
        addresses = list(self.subnet.hosts())
        if len(addresses) < len(hosts) + 1:
            raise NetworkError(f"{self.subnet} is too small for {len(hosts)} hosts")
        self._bridge_address = str(addresses[0])
        self._addresses = {host: str(addresses[i + 1]) for i, host in enumerate(hosts)}
        self._forwarding = _read("/proc/sys/net/ipv4/ip_forward")

    def namespace(self, host: str) -> str:
        return f"{PREFIX}{self.tag}-{host}"

    def veth(self, host: str) -> str:
        """The bridge-side end of ``host``'s veth pair (in the root namespace)."""
        return f"{PREFIX}{self.tag}h{self.hosts.index(host)}"

    def address(self, host: str) -> str:
        return self._addresses[host]

    def client_address(self) -> str:
        return self._bridge_address

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def describe(self) -> str:
        return (
            f"namespaces on bridge {self.bridge} ({self.subnet}, private to this machine), "
            f"{', '.join(self.capped)} capped at {self.rate_mbit} Mbit/s each way: "
            + ", ".join(f"{h}={a}" for h, a in self._addresses.items())
        )

    def build(self) -> CappedNetwork:
        prefix = f"{self.subnet.prefixlen}"
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self._bridge_address}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for host in self.hosts:
            namespace, veth = self.namespace(host), self.veth(host)
            _run(["ip", "netns", "add", namespace])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"])
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            _run(["ip", "link", "set", veth + "p", "netns", namespace])
            inside = ["ip", "netns", "exec", namespace]
            _run([*inside, "ip", "link", "set", veth + "p", "name", "eth0"])
            _run([*inside, "ip", "addr", "add", f"{self._addresses[host]}/{prefix}", "dev", "eth0"])
            _run([*inside, "ip", "link", "set", "eth0", "up"])
            _run([*inside, "ip", "link", "set", "lo", "up"])
            if host in self.capped:
                _run(tbf_argv(veth, self.rate_mbit))  # what the host receives
                _run([*inside, *tbf_argv("eth0", self.rate_mbit)])  # what it sends
        self.check_contained()
        return self

    def caps(self) -> dict[str, dict[str, str]]:
        """Per host, the root qdisc of each direction as ``tc`` shows it (for checks)."""
        found: dict[str, dict[str, str]] = {}
        for host in self.hosts:
            ingress = _run(["tc", "qdisc", "show", "dev", self.veth(host), "root"]).stdout
            egress = _run([*self.exec_prefix(host), "tc", "qdisc", "show", "dev", "eth0", "root"])
            found[host] = {"ingress": ingress.strip(), "egress": egress.stdout.strip()}
        return found

    def check_contained(self) -> None:
        """Nothing may leave the machine: no namespace has a default route and the root
        namespace forwards exactly as it did before we came."""
        for host in self.hosts:
            routes = _run([*self.exec_prefix(host), "ip", "-4", "route"]).stdout
            if "default" in routes:
                raise NetworkError(f"namespace {self.namespace(host)} has a default route")
        if _read("/proc/sys/net/ipv4/ip_forward") != self._forwarding:
            raise NetworkError("ip_forward changed while the benchmark network existed")

    def destroy(self) -> None:
        for host in self.hosts:
            _run(["ip", "netns", "delete", self.namespace(host)], check=False)
        _run(["ip", "link", "delete", self.bridge], check=False)
        for host in self.hosts:
            _run(["ip", "link", "delete", self.veth(host)], check=False)

    def leftovers(self) -> list[str]:
        """Names of ours that still exist."""
        namespaces = _run(["ip", "netns", "list"], check=False).stdout.split()
        links = _run(["ip", "-o", "link", "show"], check=False).stdout
        link_names = {p.split(":")[1].strip().split("@")[0] for p in links.splitlines() if ":" in p}
        found = [self.namespace(h) for h in self.hosts if self.namespace(h) in namespaces]
        found += [n for n in (self.bridge, *map(self.veth, self.hosts)) if n in link_names]
        return found


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()


def create_network(hosts: Sequence[str], capped: Sequence[str], rate_mbit: float) -> CappedNetwork:
    """Builds the network or raises NetworkError (with why namespaces are unavailable)."""
    available, why = namespaces_available()
    if not available:
        raise NetworkError(f"network namespaces unavailable: {why}")
    sweep_stale()
    network = CappedNetwork(hosts, capped, rate_mbit)
    try:
        return network.build()
    except BaseException:
        network.destroy()
        raise
