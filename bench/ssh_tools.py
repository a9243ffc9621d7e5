"""ssh-based tools through `malai ssh` and through ssh to an sshd of this run's own, in one run.

    python bench/ssh_tools.py [--runs 3] [--tree-mb 100] [--file-mb 200] [--cat-mb 500] [--dir /tmp]

Real daemons on loopback (a manager, web01, a laptop whose daemon holds the link) and an sshd on a
loopback port with a fresh key. Each row runs the same tool with the same data both ways: rsync (push of
a fresh tree, no-op re-sync, --delete of a tenth, pull), git clone and push, scp and sftp of one file
each way (-S malai-ssh), and a file piped through a remote `cat` and back. Median seconds of --runs, and
ssh's time over malai's (above 1.00x: malai is faster). The machine and the client share this host, so
the paths on "the machine" are local folders the bench prepares and checks directly.
"""

import argparse
import hashlib
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from common import MALAI, Cluster, Sshd, table

MALAI_SSH = str(Path(sys.executable).with_name("malai-ssh"))


class Way:
    """One transport: how rsync, git, scp, sftp and a plain command reach the machine."""

    def __init__(self, name: str, host: str, ssh: List[str], env: Dict[str, str], scp: List[str]):
        self.name = name
        self.host = host  # what goes before ":path"
        self.ssh = ssh  # the ssh command as argv, the host not included
        self.env = env
        self.scp = scp  # scp/sftp options that pick this transport

    def run(self, argv: List[str], stdin=None, stdout=subprocess.DEVNULL) -> None:
        r = subprocess.run(argv, env=self.env, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        if r.returncode:
            sys.exit(f"{self.name}: {' '.join(argv)} exited {r.returncode}: {r.stderr.decode(errors='replace')}")


def random_file(path: Path, mb: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))


def make_tree(root: Path, mb: int) -> None:
    """``mb`` MB in files of 4 KB to 1 MB, in 20 folders (one with a space), and a symlink."""
    root.mkdir()
    size, i = 0, 0
    while size < mb << 20:
        folder = root / (f"dir {i % 20}" if i % 20 == 0 else f"dir{i % 20}")
        folder.mkdir(exist_ok=True)
        n = (4096 << (i % 9))  # 4 KB … 1 MB
        (folder / f"file{i}.bin").write_bytes(os.urandom(n))
        size, i = size + n, i + 1
    (root / "link").symlink_to("dir1")


def make_repo(root: Path, bare: Path) -> None:
    """A bare repository with 200 commits over 2,000 text files of random hex (12 KB each)."""
    work = root / "repo-work"
    work.mkdir()
    git = ["git", "-C", str(work), "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    for commit in range(200):
        for i in range(10):
            path = work / f"d{(commit * 10 + i) % 50}" / f"f{commit * 10 + i}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(os.urandom(6000).hex())
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"commit {commit}"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)


def clear(*paths: Path) -> Callable[[], None]:
    def prepare() -> None:
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return prepare


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def same_tree(a: Path, b: Path) -> bool:
    r = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)], capture_output=True)
    return r.returncode == 0


Op = Tuple[str, Callable[[], None], Callable[[], None], Callable[[], bool]]  # name, prepare, run, check


def operations(way: Way, root: Path, data: Dict[str, Any]) -> List[Op]:
    """Every operation through ``way``, in order (each leaves what the next needs)."""
    tag = way.name.split()[0]
    rsync = ["rsync", "-a", "-e", " ".join(way.ssh)]
    src, far, near = root / f"src-{tag}", root / f"far-{tag}", root / f"near-{tag}"

    def fresh_src() -> None:
        clear(src)()
        shutil.copytree(data["tree"], src, symlinks=True, copy_function=os.link)

    def push() -> None:
        way.run([*rsync, f"{src}/", f"{way.host}:{far}/"])

    def delete_some() -> None:
        fresh_src()
        push()  # in step again
        for i, path in enumerate(sorted(src.rglob("*.bin"))):
            if i % 10 == 0:
                path.unlink()

    git_env = dict(way.env, GIT_SSH_COMMAND=" ".join(way.ssh))
    clone = root / f"clone-{tag}"

    def git(*args: str) -> None:
        r = subprocess.run(["git", *args], env=git_env, capture_output=True)
        if r.returncode:
            sys.exit(f"{way.name}: git {' '.join(args)}: {r.stderr.decode(errors='replace')}")

    commits = itertools.count()

    def new_commit() -> None:
        n = next(commits)
        (clone / f"push-{n}.bin").write_bytes(os.urandom(5 << 20))
        git("-C", str(clone), "add", "-A")
        git("-C", str(clone), "-c", "user.name=b", "-c", "user.email=b@example.com", "commit", "-q", "-m", f"p{n}")

    def pushed() -> bool:
        return subprocess.run(["git", "-C", str(data["repo"]), "rev-parse", f"refs/heads/{tag}"],
                              capture_output=True, text=True).stdout.strip() == \
            subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    ops: List[Op] = [
        ("rsync push of a fresh tree", lambda: (fresh_src(), clear(far)()), push, lambda: same_tree(src, far)),
        ("rsync no-op re-sync", lambda: None, push, lambda: same_tree(src, far)),
        ("rsync --delete of a tenth", delete_some, lambda: way.run([*rsync, "--delete", f"{src}/", f"{way.host}:{far}/"]),
         lambda: same_tree(src, far)),
        ("rsync pull", clear(near), lambda: way.run([*rsync, f"{way.host}:{far}/", f"{near}/"]),
         lambda: same_tree(far, near)),
        (f"git clone (200 commits, {data['repo_mb']:.0f} MB packed)", clear(clone),
         lambda: git("clone", "-q", f"{way.host}:{data['repo']}", str(clone)),
         lambda: (clone / ".git").is_dir()),
        ("git push (a 5 MB commit)", new_commit,
         lambda: git("-C", str(clone), "push", "-q", "origin", f"HEAD:refs/heads/{tag}"), pushed),
    ]
    mb = data["file"].stat().st_size >> 20
    far_file, near_file = root / f"far-file-{tag}", root / f"near-file-{tag}"
    for tool in ("scp", "sftp"):
        if tool == "scp":
            put = [tool, "-q", *way.scp, str(data["file"]), f"{way.host}:{far_file}"]
            get = [tool, "-q", *way.scp, f"{way.host}:{far_file}", str(near_file)]
        else:
            put = get = [tool, "-q", *way.scp, "-b", "-", way.host]
        put_in = f"put {data['file']} {far_file}\n".encode()
        get_in = f"get {far_file} {near_file}\n".encode()
        ops.append((f"{tool} put of {mb} MB", clear(far_file), lambda a=put, i=put_in, t=tool: _feed(way, a, i, t),
                    lambda: digest(far_file) == data["file_digest"]))
        ops.append((f"{tool} get of {mb} MB", clear(near_file), lambda a=get, i=get_in, t=tool: _feed(way, a, i, t),
                    lambda: digest(near_file) == data["file_digest"]))

    cat_mb = data["cat"].stat().st_size >> 20
    piped = root / f"piped-{tag}"

    def cat() -> None:
        with open(data["cat"], "rb") as stdin, open(piped, "wb") as stdout:
            way.run([*way.ssh, way.host, "cat"], stdin=stdin, stdout=stdout)

    ops.append((f"`cat` of {cat_mb} MB (stdin → remote cat → stdout)", clear(piped), cat,
                lambda: digest(piped) == data["cat_digest"]))
    return ops


def interleaved(ways: List[Way], ops: Dict[str, List[Op]], runs: int) -> Dict[str, List[float]]:
    """Median seconds per way and operation; each run of an operation alternates which way goes
    first, so a change in the host's load falls on both."""
    medians: Dict[str, List[float]] = {way.name: [] for way in ways}
    for i in range(len(ops[ways[0].name])):
        times: Dict[str, List[float]] = {way.name: [] for way in ways}
        for run in range(runs):
            for way in (ways if run % 2 == 0 else ways[::-1]):
                name, prepare, go, _ = ops[way.name][i]
                prepare()
                start = time.perf_counter()
                go()
                times[way.name].append(time.perf_counter() - start)
        for way in ways:
            name, _, _, check = ops[way.name][i]
            if not check():
                sys.exit(f"{way.name}: {name}: the result is not what was sent")
            medians[way.name].append(statistics.median(times[way.name]))
        print(f"{ops[ways[0].name][i][0]} done; load average {load()}", file=sys.stderr)
    return medians


def _feed(way: Way, argv: List[str], batch: bytes, tool: str) -> None:
    """scp as it is; sftp with its batch of commands on stdin."""
    if tool == "scp":
        way.run(argv, stdin=subprocess.DEVNULL)
        return
    r = subprocess.run(argv, env=way.env, input=batch, capture_output=True)
    if r.returncode:
        sys.exit(f"{way.name}: sftp: {r.stderr.decode(errors='replace')}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree-mb", type=int, default=100, help="size of the rsync tree")
    parser.add_argument("--file-mb", type=int, default=200, help="size of the scp/sftp file")
    parser.add_argument("--cat-mb", type=int, default=500, help="size piped through cat")
    parser.add_argument("--dir", default="/tmp", help="where the data goes (e.g. /dev/shm)")
    args = parser.parse_args()
    for tool in ("rsync", "git", "scp", "sftp", "ssh"):
        if shutil.which(tool) is None:
            print(f"ssh_tools: {tool} is not installed; skipped")
            return 0
    root = Path(tempfile.mkdtemp(prefix="malai-bench-", dir=args.dir))
    try:
        return _bench(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bench(root: Path, args) -> int:
    homes = root / "homes"
    homes.mkdir()

    def config(ids, ports):
        return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                f'allow_from = "laptop"\n\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n')

    data: Dict[str, Any] = {"tree": root / "tree", "repo": root / "repo.git", "file": root / "file.bin",
                             "cat": root / "cat.bin"}
    make_tree(data["tree"], args.tree_mb)
    make_repo(root, data["repo"])
    data["repo_mb"] = sum(p.stat().st_size for p in data["repo"].rglob("*") if p.is_file()) / 1e6
    random_file(data["file"], args.file_mb)
    random_file(data["cat"], args.cat_mb)
    data["file_digest"], data["cat_digest"] = digest(data["file"]), digest(data["cat"])
    print(f"load average before: {load()}", file=sys.stderr)

    with Cluster(homes, ("web01", "laptop"), config) as cluster, Sshd(root) as sshd:
        if sshd.argv is None:
            print("ssh_tools: sshd is not installed (Debian: openssh-server); skipped")
            return 0
        env = dict(os.environ, MALAI_HOME=str(cluster.homes["laptop"]))
        malai = Way("malai ssh", "web01.company", [MALAI, "ssh"], env, ["-S", MALAI_SSH])
        ssh_opts = sshd.argv[1:-1]  # everything but the program and the host
        sftp_opts = [("-P" if o == "-p" else o) for o in ssh_opts if o != "-q"]
        ssh = Way("ssh (sshd on loopback)", "127.0.0.1", ["ssh", *ssh_opts], dict(os.environ), sftp_opts)
        subprocess.run([*malai.ssh, malai.host, "true"], env=env, check=True)  # the link is up
        ops = {way.name: operations(way, root, data) for way in (malai, ssh)}
        medians = interleaved([malai, ssh], ops, args.runs)

    rows: List[Tuple[str, str, str, str]] = []
    for (name, *_), mine, theirs in zip(ops[malai.name], medians[malai.name], medians[ssh.name], strict=True):
        rows.append((name, f"{mine:.2f} s", f"{theirs:.2f} s", f"{theirs / mine:.2f}x"))
    table(f"ssh-based tools, median of {args.runs} runs, loopback (load average after: {load()})",
          ("operation", "malai ssh", "ssh", "ssh time / malai time"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
