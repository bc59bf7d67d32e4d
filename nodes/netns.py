"""Network-namespace labs: hosts joined by veth links shaped with ``tc tbf``, for multi-host tests.

Needs root and iproute2. Every address must lie in 198.18.0.0/15 (the benchmarking range, RFC 2544); any
other address is refused before anything is created. A :class:`NetnsLab` is a context manager: everything it
created (namespaces, and with them their veth ends and qdiscs) is deleted on exit, also when the body failed,
and namespace names carry the creating pid so concurrent labs never collide.

    with NetnsLab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, "198.18.1.1", b, "198.18.1.2", rate_mbit=100)
        lab.run(a, ["ip", "addr"])            # a command inside a namespace
        argv_prefix = lab.prefix(b)           # ["ip", "netns", "exec", NAME] for subprocesses

``netem`` is not available on this kernel, so links model bandwidth (``tbf rate ... burst 64kb latency
200ms``), not delay or loss; :meth:`NetnsLab.set_link` takes a link down and up to model an outage.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from ._errors import NetnsError

ALLOWED_NETWORK: Final = ipaddress.ip_network("198.18.0.0/15")
#: tbf parameters known to shape a veth TCP stream to the configured rate on this kernel (FIELD-NOTES).
TBF_BURST: Final = "64kb"
TBF_LATENCY: Final = "200ms"
_COMMAND_TIMEOUT_S: Final = 20.0


@dataclass(frozen=True)
class Host:
    """One namespace; ``name`` is the lab's short name, ``netns`` the kernel's."""

    name: str
    netns: str


@dataclass(frozen=True)
class Link:
    """A veth pair: ``a_if`` lives in host ``a``, ``b_if`` in host ``b``."""

    a: Host
    a_if: str
    a_addr: str
    b: Host
    b_if: str
    b_addr: str
    rate_mbit: float | None


def check_address(address: str) -> str:
    """``address`` if it lies in 198.18.0.0/15, else :class:`NetnsError`."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise NetnsError(f"{address!r} is not an IP address") from exc
    if ip not in ALLOWED_NETWORK:
        raise NetnsError(f"{address} is outside {ALLOWED_NETWORK}: labs use only the benchmarking range")
    return address


def available() -> str | None:
    """``None`` when labs can be built here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    return None


@dataclass
class NetnsLab:
    """Namespaces and shaped links, torn down on exit; see the module docstring."""

    tag: str = field(default_factory=lambda: f"eb{os.getpid() % 100000}")
    hosts: list[Host] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    routes: list[tuple[Host, str, str]] = field(default_factory=list)
    _veth_ids: itertools.count[int] = field(default_factory=itertools.count)

    def __enter__(self) -> NetnsLab:
        reason = available()
        if reason is not None:
            raise NetnsError(reason)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace this lab made (their veth ends and qdiscs go with them)."""
        errors = []
        for host in reversed(self.hosts):
            # iproute2 from PATH, argv built here from names this module made: no shell, no user input.
            result = subprocess.run(  # noqa: S603
                ["ip", "netns", "del", host.netns],  # noqa: S607
                capture_output=True,
                text=True,
                timeout=_COMMAND_TIMEOUT_S,
            )
            if result.returncode != 0 and "No such file" not in result.stderr:
                errors.append(f"{host.netns}: {result.stderr.strip()}")
        self.hosts.clear()
        self.links.clear()
        if errors:
            raise NetnsError("could not delete namespaces: " + "; ".join(errors))

    # ------------------------------------------------------------------ building

    def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), *args]
        self._check(argv)

    @staticmethod
    def _check(argv: list[str]) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)  # noqa: S603
        if result.returncode != 0:
            raise NetnsError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
        return result.stdout

    def host(self, name: str) -> Host:
        """A new namespace with its loopback up."""
        if not name.isalnum() or len(name) > 12:
            raise NetnsError(f"host name {name!r}: up to 12 letters or digits")
        host = Host(name=name, netns=f"{self.tag}-{name}")
        self._check(["ip", "netns", "add", host.netns])
        self.hosts.append(host)
        self._ip("link", "set", "lo", "up", netns=host.netns)
        return host

    def link(
        self, a: Host, a_addr: str, b: Host, b_addr: str, *, prefix: int = 24, rate_mbit: float | None = None
    ) -> Link:
        """A veth pair between ``a`` and ``b`` with the given addresses, shaped both ways at ``rate_mbit``."""
        check_address(a_addr)
        check_address(b_addr)
        n = next(self._veth_ids)
        a_if, b_if = f"v{n}{a.name}"[:15], f"v{n}{b.name}"[:15]
        tmp_a, tmp_b = f"{self.tag}a{n}"[:15], f"{self.tag}b{n}"[:15]
        self._ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        try:
            self._ip("link", "set", tmp_a, "netns", a.netns)
            self._ip("link", "set", tmp_b, "netns", b.netns)
        except NetnsError:
            subprocess.run(["ip", "link", "del", tmp_a], capture_output=True, timeout=_COMMAND_TIMEOUT_S)  # noqa: S603, S607
            raise
        for host, tmp, name, addr in ((a, tmp_a, a_if, a_addr), (b, tmp_b, b_if, b_addr)):
            self._ip("link", "set", tmp, "name", name, netns=host.netns)
            self._ip("addr", "add", f"{addr}/{prefix}", "dev", name, netns=host.netns)
            self._ip("link", "set", name, "up", netns=host.netns)
            if rate_mbit is not None:
                self.shape(host, name, rate_mbit)
        link = Link(a, a_if, a_addr, b, b_if, b_addr, rate_mbit)
        self.links.append(link)
        return link

    def shape(self, host: Host, ifname: str, rate_mbit: float) -> None:
        """Egress of ``ifname`` in ``host`` limited to ``rate_mbit`` by a token bucket."""
        self._check(
            ["ip", "netns", "exec", host.netns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
             "rate", f"{rate_mbit:g}mbit", "burst", TBF_BURST, "latency", TBF_LATENCY]
        )  # fmt: skip

    def route(self, host: Host, destination: str, via: str) -> None:
        """Route ``destination`` (a CIDR in the allowed range) from ``host`` through ``via``."""
        network = ipaddress.ip_network(destination, strict=False)
        if not network.subnet_of(ALLOWED_NETWORK):  # type: ignore[arg-type]
            raise NetnsError(f"{destination} is outside {ALLOWED_NETWORK}")
        check_address(via)
        self._ip("route", "replace", str(network), "via", via, netns=host.netns)
        self.routes.append((host, str(network), via))

    def forward(self, host: Host) -> None:
        """Let ``host`` forward IPv4 between its links (a router in the middle of a chain)."""
        self._check(["ip", "netns", "exec", host.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def set_link(self, link: Link, *, up: bool) -> None:
        """Take both ends of ``link`` down (an outage) or bring them back up.

        The kernel drops routes through an interface that goes down; bringing the link up restores the
        lab's static routes of both hosts, as a router's routing daemon would.
        """
        state = "up" if up else "down"
        self._ip("link", "set", link.a_if, state, netns=link.a.netns)
        self._ip("link", "set", link.b_if, state, netns=link.b.netns)
        if up:
            for host, network, via in self.routes:
                if host in (link.a, link.b):
                    self._ip("route", "replace", network, "via", via, netns=host.netns)

    # ------------------------------------------------------------------ running

    @staticmethod
    def prefix(host: Host) -> list[str]:
        """argv prefix that runs a command inside ``host``."""
        return ["ip", "netns", "exec", host.netns]

    def run(self, host: Host, argv: list[str]) -> str:
        """Run a short command inside ``host``; returns its stdout (NetnsError on failure)."""
        return self._check([*self.prefix(host), *argv])
