"""``malai config``: download, upload, edit, show, history and roll back a cluster's ``cluster.toml``.

On the cluster manager these work on the files directly; on any other member
they go to the manager over a peer link, where only ``config_editors`` may use
them. A downloaded file starts with a line holding its base hash; ``upload``
succeeds only while that is still the current hash.
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Tuple

from malai.atomic import write_atomic
from malai.cli.common import home_of, print_json, run_twisted
from malai.config.cluster import parse_cluster
from malai.config.errors import ConfigError
from malai.config.store import ClusterStore, Revision
from malai.errors import MalaiError, UsageError
from malai.home import MANAGER

MARKER = re.compile(r"^# malai: base sha256 ([0-9a-f]{64})\b.*\n")


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="download, edit and upload a cluster's cluster.toml")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    d = csub.add_parser("download", help="the current cluster.toml, with its base hash line")
    d.add_argument("cluster")
    d.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    d.set_defaults(run=lambda a: _run(_download, a))

    u = csub.add_parser("upload", help="replace cluster.toml if nobody changed it since your download")
    u.add_argument("cluster")
    u.add_argument("file", help="a file from `malai config download` (its first line holds the base hash)")
    u.add_argument("--force", action="store_true", help="replace even if it changed since")
    u.set_defaults(run=lambda a: _run(_upload, a))

    e = csub.add_parser("edit", help="$EDITOR on the current cluster.toml, then upload")
    e.add_argument("cluster")
    e.set_defaults(run=lambda a: _run(_edit, a))

    s = csub.add_parser("show", help="print cluster.toml (or a version from history)")
    s.add_argument("cluster")
    s.add_argument("version", nargs="?", type=int)
    s.set_defaults(run=lambda a: _run(_show, a))

    h = csub.add_parser("history", help="every accepted version, when and by whom")
    h.add_argument("cluster")
    h.add_argument("--json", action="store_true", help="print JSON")
    h.set_defaults(run=lambda a: _run(_history, a))

    r = csub.add_parser("rollback", help="make an earlier version current again (as a new version)")
    r.add_argument("cluster")
    r.add_argument("version", type=int)
    r.set_defaults(run=lambda a: _run(_rollback, a))


def _run(action, args) -> int:
    home = home_of(args)
    [entry] = home.scan(args.cluster)
    if entry.role == MANAGER:
        return run_twisted(_with, home, _Local(ClusterStore(entry.path)), action, args)
    if entry.identity is None or entry.role is None:
        raise MalaiError("\n".join(entry.problems))
    return run_twisted(_with, home, _Remote(home, entry.alias), action, args)


async def _with(reactor, home, backend, action, args) -> int:
    try:
        await backend.open(reactor)
        code = await action(backend, args)
    finally:
        await backend.close()
    if getattr(backend, "changed", False):  # a local change: the running daemon applies it now
        from malai.cli.rescan import apply_if_running

        await apply_if_running(reactor, home, args.cluster, False)
    return code


class _Local:
    """This device is the manager: the store itself."""

    def __init__(self, store: ClusterStore):
        self.store = store
        self.changed = False

    async def open(self, reactor) -> None:
        pass

    async def close(self) -> None:
        pass

    async def get(self, version: Optional[int] = None) -> Revision:
        return self.store.current() if version is None else self.store.revision(version)

    async def put(self, text: str, base: Optional[str], force: bool) -> Revision:
        rev = self.store.upload(text, base, force)
        self.changed = True
        return rev

    async def history(self) -> list:
        return self.store.history()


class _Remote:
    """A member: ask the manager over a peer link (dialed directly)."""

    def __init__(self, home, alias: str):
        self.home = home
        self.alias = alias
        self.context: Any = None
        self.link: Any = None

    async def open(self, reactor) -> None:
        from malai.cli.direct import DirectContext

        self.context = DirectContext(self.home, reactor, self.alias)
        cluster = self.context.cluster(self.alias)
        self.link = await self.context.pool.get(cluster.identity, cluster.target("manager"))

    async def close(self) -> None:
        if self.context is not None:
            await self.context.close()

    async def _call(self, command, **kwargs):
        from malai.peer.commands import ConfigRefused, NotAllowed, StaleBase

        try:
            return await self.link.callRemote(command, **kwargs)
        except (ConfigRefused, NotAllowed, StaleBase) as e:
            raise MalaiError(str(e)) from None

    async def get(self, version: Optional[int] = None) -> Revision:
        from malai.peer.commands import GetConfig

        answer = await self._call(GetConfig, **({} if version is None else {"version": version}))
        return Revision(answer["version"], answer["sha256"], answer["body"])

    async def put(self, text: str, base: Optional[str], force: bool) -> Revision:
        from malai.peer.commands import PutConfig

        answer = await self._call(PutConfig, body=text, force=force, **({"base": base} if base else {}))
        return Revision(answer["version"], answer["sha256"], text)

    async def history(self) -> list:
        from malai.peer.commands import ConfigHistory

        return (await self._call(ConfigHistory))["versions"]


def _with_marker(rev: Revision) -> str:
    return f"# malai: base sha256 {rev.sha256} (version {rev.version}); keep this line for upload\n{rev.text}"


def _split_marker(text: str) -> Tuple[Optional[str], str]:
    m = MARKER.match(text)
    return (m.group(1), text[m.end():]) if m else (None, text)


async def _download(backend, args) -> int:
    rev = await backend.get()
    if args.output:
        write_atomic(Path(args.output), _with_marker(rev).encode(), mode=0o600)
    else:
        sys.stdout.write(_with_marker(rev))
    print(f"version {rev.version}, sha256 {rev.sha256}", file=sys.stderr)
    return 0


async def _upload(backend, args) -> int:
    base, text = _split_marker(Path(args.file).read_text())
    if base is None and not args.force:
        raise UsageError(f"{args.file} has no '# malai: base sha256 …' first line: start from "
                         f"`malai config download {args.cluster} -o FILE`, or use --force")
    rev = await backend.put(text, base, args.force)
    print(f"uploaded {args.cluster} cluster.toml: version {rev.version}, sha256 {rev.sha256}")
    return 0


async def _show(backend, args) -> int:
    rev = await backend.get(args.version)
    sys.stdout.write(rev.text)
    print(f"version {rev.version}, sha256 {rev.sha256}", file=sys.stderr)
    return 0


async def _history(backend, args) -> int:
    versions = await backend.history()
    if args.json:
        print_json(versions)
        return 0
    for v in versions:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["time"]))
        print(f"{v['version']:>5}  {when}  {v['sha256']}  {v.get('by') or '-'}")
    return 0


async def _rollback(backend, args) -> int:
    old = await backend.get(args.version)
    current = await backend.get()
    rev = await backend.put(old.text, current.sha256, False)
    print(f"rolled {args.cluster} back to the content of version {args.version}: now version {rev.version}")
    return 0


async def _edit(backend, args) -> int:
    rev = await backend.get()
    editor = shlex.split(os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi")
    fd, name = tempfile.mkstemp(prefix=f"{args.cluster}-", suffix=".toml")
    os.close(fd)
    path = Path(name)
    keep = False
    try:
        path.write_text(_with_marker(rev))
        while True:
            if subprocess.call([*editor, str(path)]) != 0:
                keep = True
                raise MalaiError(f"the editor {editor[0]} failed; your edit is left in {path}")
            base, text = _split_marker(path.read_text())
            text = _strip_errors(text)
            if text == rev.text:
                print("no changes")
                return 0
            try:
                parse_cluster(text, "cluster.toml")
                new = await backend.put(text, base or rev.sha256, False)
                print(f"uploaded {args.cluster} cluster.toml: version {new.version}, sha256 {new.sha256}")
                return 0
            except ConfigError as e:
                errors = str(e)
            except MalaiError as e:
                if "changed since you downloaded" in str(e):
                    keep = True
                    raise MalaiError(f"{e}\nyour edit is left in {path}") from None
                errors = str(e)
            path.write_text(f"# malai: base sha256 {base or rev.sha256} (version {rev.version}); keep this line "
                            "for upload\n" + "".join(f"# ERROR: {line}\n" for line in errors.splitlines()) + text)
            print("the config has errors; reopening the editor with them at the top", file=sys.stderr)
    finally:
        if not keep:
            path.unlink(missing_ok=True)


def _strip_errors(text: str) -> str:
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("# ERROR: "):
        lines.pop(0)
    return "".join(lines)
