"""A private Tor network on 127.0.0.1 for tests (recipe: ../shared/notes/tor-test-network.md).

3 authorities (also relays), 2 relays, a client and an onion-service host,
each a ``tor`` process in the given network namespace, so nothing leaves
the machine. ``control(name)`` is a node's control-port endpoint string.
"""

import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List

COMMON = """TestingTorNetwork 1
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit *
TestingDirAuthVoteHSDir *
TestingDirAuthVoteGuard *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
DataDirectory {dir}
RunAsDaemon 0
ConnLimit 60
Nickname {nick}
ShutdownWaitLength 0
ControlPort 127.0.0.1:{control}
CookieAuthentication 0
PidFile {dir}/pid
Log notice file {dir}/notice.log
SafeLogging 0
Sandbox 0
"""
RELAY = """SocksPort 0
OrPort 127.0.0.1:{orport}
Address 127.0.0.1
ExitRelay 0
ServerDNSDetectHijacking 0
ServerDNSTestAddresses
DirPort 127.0.0.1:{dirport}
AssumeReachable 1
"""
AUTHORITY = """AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
ContactInfo a@test.test
TestingV3AuthInitialVotingInterval 5
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVotingInterval 10
V3AuthVoteDelay 2
V3AuthDistDelay 2
"""


class TorNetwork:
    def __init__(self, root: Path, netns: str, base_port: int = 15000, relays: int = 2):
        self.root = root
        self.netns = netns
        self.base = base_port
        self.nodes: List[str] = [f"auth{i}" for i in range(3)] + [f"relay{i}" for i in range(relays)] + ["client",
                                                                                                        "hs"]
        self.procs: List[subprocess.Popen] = []
        self.ports: Dict[str, Dict[str, int]] = {
            name: {"orport": base_port + i, "dirport": base_port + 100 + i, "control": base_port + 200 + i,
                   "socks": base_port + 300 + i} for i, name in enumerate(self.nodes)}

    def _exec(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True, check=True,
                              **kw)

    def _dir(self, name: str) -> Path:
        path = self.root / name
        (path / "keys").mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        return path

    def start(self) -> None:
        authorities = []
        for name in self.nodes[:3]:
            d, ports = self._dir(name), self.ports[name]
            self._exec("tor-gencert", "--create-identity-key", "--passphrase-fd", "0", "-i",
                       f"{d}/keys/authority_identity_key", "-s", f"{d}/keys/authority_signing_key", "-c",
                       f"{d}/keys/authority_certificate", "-m", "12", "-a", f"127.0.0.1:{ports['dirport']}",
                       input="\n")
            v3ident = re.search(r"^fingerprint (\S+)", (d / "keys" / "authority_certificate").read_text(),
                                re.M).group(1)
            fingerprint = self._exec("tor", "--ignore-missing-torrc", "-f", "/nonexistent", "--orport", "1",
                                     "--datadirectory", str(d), "--list-fingerprint").stdout.strip().splitlines()[-1]
            fingerprint = "".join(fingerprint.split()[1:])
            authorities.append(f"DirAuthority {name} orport={ports['orport']} no-v2 v3ident={v3ident} "
                               f"127.0.0.1:{ports['dirport']} {fingerprint}\n")
        for name in self.nodes:
            d, ports = self._dir(name), self.ports[name]
            torrc = COMMON.format(dir=d, nick=name, control=ports["control"]) + "".join(authorities)
            if name.startswith(("auth", "relay")):
                torrc += RELAY.format(**ports)
            if name.startswith("auth"):
                torrc += AUTHORITY
            if name == "client":
                torrc += f"SocksPort 127.0.0.1:{ports['socks']}\n"
            if name == "hs":
                torrc += "SocksPort 0\n"
            (d / "torrc").write_text(torrc)
            self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.netns, "tor", "-f", str(d / "torrc")],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait_bootstrapped(self, timeout: float = 300) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            logs = [(self.root / name / "notice.log") for name in self.nodes]
            if all(log.exists() and "Bootstrapped 100%" in log.read_text() for log in logs):
                return time.monotonic() - start
            time.sleep(0.5)
        behind = []
        for name in self.nodes:
            log = self.root / name / "notice.log"
            lines = log.read_text().splitlines() if log.exists() else ["no log"]
            if not any("Bootstrapped 100%" in line for line in lines):
                behind.append(f"{name}: {lines[-1] if lines else 'empty log'}")
        raise AssertionError(f"the private Tor network did not bootstrap within {timeout:g}s; still behind:\n"
                             + "\n".join(behind))

    def control(self, name: str) -> str:
        return f"tcp:127.0.0.1:{self.ports[name]['control']}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
