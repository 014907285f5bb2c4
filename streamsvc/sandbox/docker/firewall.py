"""Whether the sandbox bridge network is isolated: the host's firewall rules, checked.

``scripts/_lib.sh`` (``ensure_sandbox_firewall``) drops the network's traffic to private
ranges and the host's LAN (``DOCKER-USER``) and new connections to the host (``INPUT``).
The rule: until ``BridgeIsolation`` finds them all, bridge runs and installs are refused.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import shutil
import socket
from typing import Any

import aiodocker
import anyio
import psutil

from streamsvc.errors import BridgeUnprotected, EngineRefused
from streamsvc.sandbox.docker.api import NOT_FOUND, docker_call, ensure_network

log = logging.getLogger("streamsvc.sandbox")

#: Dropped for the sandbox network by ensure_sandbox_firewall (besides the host's LAN).
PRIVATE_RANGES = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
)
#: Seconds a check holds; then the next look checks again (rules may change).
CHECK_TTL = 5.0
_IPTABLES_TIMEOUT = 10.0


class BridgeIsolation:
    """The last verdict on the sandbox network's firewall: ``protected`` or ``unprotected``."""

    def __init__(self, docker: aiodocker.Docker, network: str) -> None:
        self._docker = docker
        self._network = network
        self.state = "unchecked"
        self.reason = "not checked yet"
        self._checked_at: float | None = None
        self._lock = anyio.Lock()

    def report(self) -> dict[str, str]:
        found = {"state": self.state}
        if self.state != "protected":
            found["reason"] = self.reason
        return found

    def forget(self, why: str) -> None:
        """Something changed (the service created the network): check again next time."""
        self.state, self.reason, self._checked_at = "unprotected", why, None

    async def current(self) -> str:
        """The verdict, checked again when older than ``CHECK_TTL``."""
        async with self._lock:
            now = anyio.current_time()
            if self._checked_at is None or now - self._checked_at > CHECK_TTL:
                self.reason = await self._problem() or ""
                self.state = "unprotected" if self.reason else "protected"
                self._checked_at = anyio.current_time()
        return self.state

    async def ensure(self) -> None:
        """The network (created if missing: then it has no rules yet), and its isolation."""
        if await ensure_network(self._docker, self._network):
            log.warning("created the sandbox network %s: it has no firewall rules", self._network)
            self.forget("the service created the network itself")
        await self.require()

    async def require(self) -> None:
        """Raise ``BridgeUnprotected`` unless the network's isolation is in place."""
        if await self.current() != "protected":
            raise BridgeUnprotected(
                f"bridge networking is refused: the sandbox network is not isolated ({self.reason})"
            )

    async def _problem(self) -> str | None:
        """Why the network is not isolated, or ``None`` when every rule is in place."""
        try:
            info: dict[str, Any] = await docker_call(
                "inspect the sandbox network", self._get_network()
            )
        except EngineRefused as exc:
            if exc.engine_status == NOT_FOUND:
                return f"the network {self._network} does not exist; create it with scripts/run"
            raise
        if info.get("EnableIPv6"):
            return "the network has IPv6, which the firewall does not cover (create it IPv4-only)"
        subnets = [
            str(config["Subnet"])
            for config in (info.get("IPAM") or {}).get("Config") or []
            if config.get("Subnet")
        ]
        if not subnets:
            return "the network has no subnet to firewall"
        iptables = shutil.which("iptables") or shutil.which("iptables", path="/usr/sbin:/sbin")
        if iptables is None:
            return "iptables is not available to check the rules"
        rules: dict[str, list[list[str]]] = {}
        for chain in ("DOCKER-USER", "INPUT"):
            try:
                with anyio.fail_after(_IPTABLES_TIMEOUT):
                    done = await anyio.run_process([iptables, "-w", "-S", chain], check=False)
            except (OSError, TimeoutError) as exc:
                return f"cannot read the {chain} rules: {exc}"
            if done.returncode != 0:
                error = done.stderr.decode(errors="replace").strip()
                return f"cannot read the {chain} rules (needs root): {error}"
            rules[chain] = [line.split() for line in done.stdout.decode().splitlines()]
        for subnet in subnets:
            missing = _missing(subnet, rules)
            if missing:
                return missing
        return None

    async def _get_network(self) -> dict[str, Any]:
        network = await self._docker.networks.get(self._network)
        found: dict[str, Any] = await network.show()
        return found


def host_lan(subnet: str) -> list[str]:
    """The host's own IPv4 interface subnets outside the private ranges (and the sandbox's)."""
    private = [ipaddress.ip_network(r) for r in PRIVATE_RANGES]
    own = ipaddress.ip_network(subnet)
    found: set[str] = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family != socket.AF_INET or not address.netmask:
                continue
            network = ipaddress.ip_interface(f"{address.address}/{address.netmask}").network
            if network.is_loopback or network == own:
                continue
            if not any(network.subnet_of(p) for p in private):  # type: ignore[arg-type]
                found.add(str(network))
    return sorted(found)


def _missing(subnet: str, rules: dict[str, list[list[str]]]) -> str | None:
    """The first rule ensure_sandbox_firewall makes for ``subnet`` that is not there."""
    if ipaddress.ip_network(subnet).version != 4:
        return f"the network's IPv6 subnet {subnet} is not firewalled"

    def has(chain: str, *wanted: str) -> bool:
        return any(_contains(rule, wanted) for rule in rules[chain])

    for target in (*PRIVATE_RANGES, *host_lan(subnet)):
        if not has("DOCKER-USER", "-s", subnet, "-d", target, "-j", "DROP"):
            return f"no DOCKER-USER rule drops {subnet} -> {target}"
    if not has("INPUT", "-s", subnet, "-j", "DROP"):
        return f"no INPUT rule drops new connections from {subnet} to the host"
    return None


def _contains(rule: list[str], wanted: tuple[str, ...]) -> bool:
    """Whether ``rule`` has each option/value pair of ``wanted`` (pairs, in any order)."""
    pairs = set(itertools.pairwise(rule))
    return all((wanted[i], wanted[i + 1]) in pairs for i in range(0, len(wanted), 2))
