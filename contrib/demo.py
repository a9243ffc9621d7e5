"""``make demo``: a real cluster on this machine, printing each step.

Creates a cluster manager and machines in temporary MALAI_HOMEs with the
installed ``malai`` command, wires them together in ``cluster.toml`` and
shows what each device knows.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MALAI = shutil.which("malai") or str(Path(sys.executable).with_name("malai"))


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def malai(home: Path, *args: str, check: bool = True) -> str:
    print(f"$ MALAI_HOME={home.name} malai {' '.join(args)}", flush=True)
    r = subprocess.run([MALAI, *args], env=dict(os.environ, MALAI_HOME=str(home)),
                       capture_output=True, text=True)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "))
    if r.returncode and not check:
        print(f"  (exit status {r.returncode})")
    if check and r.returncode:
        sys.exit(f"demo failed: malai {' '.join(args)} exited {r.returncode}")
    return r.stdout


def listen_addr(home: Path) -> str:
    import json

    out = subprocess.run([MALAI, "status", "--json"], env=dict(os.environ, MALAI_HOME=str(home)),
                         capture_output=True, text=True).stdout
    return json.loads(out)["listen"][0]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="malai-demo-", dir="/tmp"))
    cm, web, laptop = (root / n for n in ("cm", "web01", "laptop"))
    started = []
    try:
        run(root, cm, web, laptop, started)
    finally:
        if started:
            step("Stopping the daemons")
        for home in started:
            malai(home, "stop", check=False)
    print(f"\ndemo homes left in {root} (remove with: rm -r {root})")


def run(root: Path, cm: Path, web: Path, laptop: Path, started: list) -> None:
    step("A cluster manager creates cluster 'company' and starts its daemon")
    out = malai(cm, "cluster", "init", "company")
    cm_id52 = re.search(r"manager ID52: (\S+)", out).group(1)
    malai(cm, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
    started.append(cm)
    cm_addr = listen_addr(cm)

    step("Two devices join it and start their daemons: a machine (web01) and a client (laptop)")
    ids, addrs = {}, {}
    for home, name in ((web, "web01"), (laptop, "laptop")):
        out = malai(home, "machine", "init", cm_id52, "company", "--addr", cm_addr, "--name", name)
        ids[name] = re.search(r"machine ID52: (\S+)", out).group(1)
        malai(home, "daemon", "--listen", "tcp:0:interface=127.0.0.1")
        started.append(home)
        addrs[name] = listen_addr(home)

    step("The admin adds them to cluster.toml: laptop may run commands on web01")
    config = cm / "clusters" / "company" / "cluster.toml"
    with open(config, "a") as f:
        f.write(f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["{addrs["web01"]}"]\nallow_from = "laptop"\n'
                f'\n[machine.web01.command.uptime]\ncommand = "uptime"\nallow_from = "*"\n'
                f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\naddrs = ["{addrs["laptop"]}"]\n')
    print(f"  appended [machine.web01] and [machine.laptop] to {config}")
    malai(cm, "rescan", "--check")
    malai(cm, "rescan")

    step("The manager explains who may do what")
    malai(cm, "acl", "check", "company", "--from", "laptop", "--machine", "web01", "--command", "ps", "aux")
    malai(cm, "acl", "check", "company", "--from", "web01", "--machine", "web01", "--command", "ps", check=False)
    malai(cm, "acl", "check", "company", "--from", "web01", "--machine", "web01", "--command", "uptime")

    step("Peer links: mutually authenticated TLS 1.3, pinned to each ID52")
    malai(laptop, "ping", "manager.company", "--count", "2")
    malai(cm, "ping", "web01.company")
    malai(cm, "ping", "laptop.company")

    step("laptop runs commands on web01: any argv (allow_from), and the named command `uptime`")
    malai(laptop, "web01.company", "uname", "-sr")
    malai(laptop, "web01.company", "uptime")
    malai(laptop, "web01.company", "sh", "-c", "echo to stderr >&2; exit 3", check=False)

    step("web01 serves files on its loopback only; laptop reaches them through a TCP forward")
    site = root / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from web01, through malai\n")
    upstream = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(upstream), "--bind", "127.0.0.1",
                               "--directory", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with open(config, "a") as f:
            f.write(f'\n[machine.web01.tcp.files]\nport = {upstream}\nallow_from = "laptop"\n')
        print(f"  appended [machine.web01.tcp.files] (port {upstream}) to {config}")
        malai(cm, "rescan")
        local = free_port()
        malai(laptop, "service", "add", "tcp", "files", f"127.0.0.1:{local}", "files.web01.company")
        body = fetch(f"http://127.0.0.1:{local}/index.html")
        print(f"$ curl http://127.0.0.1:{local}/index.html\n  {body.strip()}")
        malai(laptop, "service", "list")

        step("The same server as an HTTP service: laptop's HTTP front reaches it by name")
        with open(config, "a") as f:
            f.write(f'\n[machine.web01.http.site]\nport = {upstream}\nallow_from = "laptop"\n')
        print(f"  appended [machine.web01.http.site] (port {upstream}) to {config}")
        malai(cm, "rescan")
        front = free_port()
        malai(laptop, "service", "add", "http", f"127.0.0.1:{front}")
        url = f"http://site.company.localhost:{front}/index.html"
        body = fetch(f"http://127.0.0.1:{front}/index.html", host=f"site.company.localhost:{front}")
        print(f"$ curl {url}\n  {body.strip()}")
        malai(laptop, "open", "site.company", "--print-only")
    finally:
        server.terminate()

    step("Each daemon's view")
    for home in (cm, web, laptop):
        malai(home, "status")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, host: str = "", attempts: int = 50) -> str:
    """GET ``url`` (with ``host`` as its Host), retrying while web01 takes its new config."""
    import time
    import urllib.request

    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo failed: {url} did not answer")


if __name__ == "__main__":
    main()
