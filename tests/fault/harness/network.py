"""Where the fault harness's processes live: one Linux network namespace per host, or loopback.

:class:`NamespaceNetwork` (root only) builds, for one test session::

    root namespace:  bridge tfqb<tag>  10.x.y.(n+1)/28   <- the test process (clients)
                       |-- veth tfq<tag>h<i>  <->  eth0 in namespace tfq<tag>-<host>
    namespace tfq<tag>-<host>:  lo, eth0 10.x.y.(n+2+i)/28, no default route

``tag`` comes from the creating process's PID, so parallel sessions never share a
name. The /28 is chosen from the PID too and skipped when any route of the machine
overlaps it; the namespaces have no default route and the root namespace does not
forward (we check ``ip_forward`` stays as we found it), so no packet ever leaves this
machine. ``destroy()`` deletes every namespace (which takes its veth pair along) and the
bridge; it is idempotent and tolerates half-built states, so a fixture calls it in
``finally``. :func:`sweep_stale` removes what a killed earlier session of ours left
behind (only names whose PID is no longer alive).

Network faults act inside a host's namespace: ``link_down`` (``ip link set eth0
down``), ``isolate`` (iptables DROP on eth0 both ways), ``lossy`` (iptables
``-m statistic --mode random`` DROP). ``heal`` undoes all of them.

:class:`LoopbackNetwork` is the fallback when namespaces are unavailable: every host
is 127.0.0.1 and the network faults are unsupported (``supports_network_faults``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

PREFIX = "tfq"
_COMMAND_TIMEOUT_S = 20.0


class NetworkError(Exception):
    """A network setup or fault command failed; the message holds its output."""


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
    )
    if check and completed.returncode != 0:
        raise NetworkError(
            f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr.strip()}"
        )
    return completed


def namespaces_available() -> tuple[bool, str]:
    """(True, "") when this process can build namespaces, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "not root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return False, f"{tool} not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    created = _run(["ip", "netns", "add", probe], check=False)
    if created.returncode != 0:
        return False, f"ip netns add failed: {created.stderr.strip()}"
    try:
        rules = _run(["ip", "netns", "exec", probe, "iptables", "-w", "-L", "INPUT"], check=False)
        if rules.returncode != 0:
            return False, f"iptables unusable in a namespace: {rules.stderr.strip()}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    return True, ""


def _routes_overlap(subnet: ipaddress.IPv4Network) -> bool:
    routes = _run(["ip", "-4", "route", "show", "table", "all"]).stdout
    for line in routes.splitlines():
        destination = line.split()[0] if line.split() else ""
        if destination in ("default", "broadcast", "local", "unreachable", "multicast"):
            destination = line.split()[1] if len(line.split()) > 1 else ""
        try:
            network = ipaddress.ip_network(destination, strict=False)
        except ValueError:
            continue
        if (
            isinstance(network, ipaddress.IPv4Network)
            and network.prefixlen > 0
            and (network.overlaps(subnet))
        ):
            return True
    return False


def choose_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /28 in 10.0.0.0/8 that no route of this machine touches, starting at ``seed``."""
    for attempt in range(256):
        index = (seed + attempt * 7919) % (1 << 20)
        subnet = ipaddress.ip_network(
            f"10.{index >> 12}.{(index >> 4) & 255}.{(index & 15) << 4}/28"
        )
        assert isinstance(subnet, ipaddress.IPv4Network)
        if not _routes_overlap(subnet):
            return subnet
    raise NetworkError("no free 10.x /28 subnet found for the fault network")


def sweep_stale() -> list[str]:
    """Deletes namespaces and bridges named tfq<pid>... whose pid is dead; returns them."""
    removed: list[str] = []
    pattern = re.compile(rf"^{PREFIX}(\d+)")

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
    for line in _run(
        ["ip", "-o", "link", "show", "type", "bridge"], check=False
    ).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(PREFIX + "b") and dead(PREFIX + name[len(PREFIX) + 1 :]):
            _run(["ip", "link", "delete", name], check=False)
            removed.append(name)
    return removed


class LoopbackNetwork:
    """Every host on 127.0.0.1; no network faults."""

    kind = "loopback"
    supports_network_faults = False

    def __init__(self, hosts: Sequence[str], reason: str = "asked for loopback") -> None:
        self.hosts = list(hosts)
        self.reason = reason

    def address(self, host: str) -> str:
        return "127.0.0.1"

    def client_address(self) -> str:
        return "127.0.0.1"

    def exec_prefix(self, host: str) -> list[str]:
        return []

    def destroy(self) -> None:
        pass

    def describe(self) -> str:
        return f"loopback processes ({self.reason}): network faults skipped"


class NamespaceNetwork:
    """One namespace per host on a private bridge; see the module docstring."""

    kind = "netns"
    supports_network_faults = True

    def __init__(self, hosts: Sequence[str], tag: str | None = None) -> None:
        self.tag = tag or str(os.getpid())
        self.hosts = list(hosts)
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

    def _veth(self, host: str) -> str:
        return f"{PREFIX}{self.tag}h{self.hosts.index(host)}"

    def address(self, host: str) -> str:
        return self._addresses[host]

    def client_address(self) -> str:
        return self._bridge_address

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def describe(self) -> str:
        return (
            f"network namespaces on bridge {self.bridge} ({self.subnet}, private to this "
            f"machine): " + ", ".join(f"{h}={a}" for h, a in self._addresses.items())
        )

    def build(self) -> NamespaceNetwork:
        prefix = f"{self.subnet.prefixlen}"
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self._bridge_address}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for host in self.hosts:
            namespace, veth = self.namespace(host), self._veth(host)
            _run(["ip", "netns", "add", namespace])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"])
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            _run(["ip", "link", "set", veth + "p", "netns", namespace])
            inside = ["ip", "netns", "exec", namespace, "ip"]
            _run([*inside, "link", "set", veth + "p", "name", "eth0"])
            _run([*inside, "addr", "add", f"{self._addresses[host]}/{prefix}", "dev", "eth0"])
            _run([*inside, "link", "set", "eth0", "up"])
            _run([*inside, "link", "set", "lo", "up"])
        self.check_contained()
        return self

    def check_contained(self) -> None:
        """Nothing may leave the machine: no namespace has a default route and the root
        namespace forwards exactly as it did before we came."""
        for host in self.hosts:
            routes = _run([*self.exec_prefix(host), "ip", "-4", "route"]).stdout
            if "default" in routes:
                raise NetworkError(f"namespace {self.namespace(host)} has a default route")
        if _read("/proc/sys/net/ipv4/ip_forward") != self._forwarding:
            raise NetworkError("ip_forward changed while the fault network existed")

    def destroy(self) -> None:
        for host in self.hosts:
            _run(["ip", "netns", "delete", self.namespace(host)], check=False)
        _run(["ip", "link", "delete", self.bridge], check=False)
        for host in self.hosts:
            _run(["ip", "link", "delete", self._veth(host)], check=False)

    def leftovers(self) -> list[str]:
        """Names of ours that still exist (for the teardown test)."""
        namespaces = _run(["ip", "netns", "list"], check=False).stdout
        links = _run(["ip", "-o", "link", "show"], check=False).stdout
        found = [self.namespace(h) for h in self.hosts if self.namespace(h) in namespaces]
        found += [name for name in (self.bridge,) if f" {name}:" in links or f" {name}@" in links]
        return found

    # -- faults ------------------------------------------------------------------------

    def _iptables(self, host: str, *rule: str) -> None:
        _run([*self.exec_prefix(host), "iptables", "-w", "5", *rule])

    def link_down(self, host: str) -> None:
        _run([*self.exec_prefix(host), "ip", "link", "set", "eth0", "down"])

    def isolate(self, host: str) -> None:
        self._iptables(host, "-A", "INPUT", "-i", "eth0", "-j", "DROP")
        self._iptables(host, "-A", "OUTPUT", "-o", "eth0", "-j", "DROP")

    def lossy(self, host: str, probability: float) -> None:
        if not 0.0 < probability < 1.0:
            raise ValueError(f"loss probability must be in (0, 1), not {probability}")
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self._iptables(
                host, "-A", chain, direction, "eth0", "-m", "statistic", "--mode", "random",
                "--probability", f"{probability:.3f}", "-j", "DROP",
            )  # fmt: skip

    def heal(self, host: str) -> None:
        self._iptables(host, "-F", "INPUT")
        self._iptables(host, "-F", "OUTPUT")
        _run([*self.exec_prefix(host), "ip", "link", "set", "eth0", "up"])
        address = f"{self._addresses[host]}/{self.subnet.prefixlen}"
        addresses = _run([*self.exec_prefix(host), "ip", "-4", "addr", "show", "eth0"]).stdout
        if address not in addresses:
            raise NetworkError(f"{host} lost its address {address} on eth0")


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()


Network = LoopbackNetwork | NamespaceNetwork


def create_network(hosts: Sequence[str], mode: str = "auto") -> Network:
    """``mode``: "netns" (fail when unavailable), "loopback", or "auto" (netns when we can)."""
    if mode not in ("auto", "netns", "loopback"):
        raise ValueError(f"network mode must be auto, netns or loopback, not {mode!r}")
    if mode == "loopback":
        return LoopbackNetwork(hosts)
    available, why = namespaces_available()
    if not available:
        if mode == "netns":
            raise NetworkError(f"network namespaces unavailable: {why}")
        return LoopbackNetwork(hosts, reason=f"network namespaces unavailable: {why}")
    sweep_stale()
    network_ns = NamespaceNetwork(hosts)
    try:
        return network_ns.build()
    except BaseException:
        network_ns.destroy()
        raise
