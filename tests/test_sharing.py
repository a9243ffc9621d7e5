"""Sharing by identity with no cluster (issue 18): ``malai identity``, ``malai tcp`` and
``malai tcp-bridge``, as real processes on loopback."""

import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.identity import Identity, parse_id52
from malai.p2p.link import PeerAddress
from malai.p2p.tls import ALPN, PeerTLS
from malai.peer.streams import StreamRefused, StreamRequest
from malai.services.sharing import SHARE_TARGET, TcpShare
from tests.helpers import KEYS, MALAI, run_malai, short_home
from tests.test_tcp_forward import _recv_all, _Server


def ok(home: Path, *args: str, **kw) -> str:
    r = run_malai(home, *args, **kw)
    if r.returncode != 0:
        raise AssertionError(f"malai {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r.stdout


class IdentityCommandTests(TestCase):
    """``malai identity create|list|export|import|delete``."""

    def setUp(self):
        self.home = short_home(self)
        self.folder = self.home / "identities"

    def test_create_prints_the_id52_alone_and_keeps_the_key_0600(self):
        out = ok(self.home, "identity", "create")
        id52 = parse_id52(out.strip())
        self.assertEqual(out, id52 + "\n")
        key = self.folder / "default.private-key"
        self.assertEqual(stat.S_IMODE(key.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.folder.stat().st_mode), 0o700)
        self.assertEqual(Identity.load(key).id52, id52)
        self.assertEqual(list(self.folder.iterdir()), [key])  # no temp file left
        named = ok(self.home, "identity", "create", "work").strip()
        self.assertNotEqual(named, id52)
        self.assertEqual(Identity.load(self.folder / "work.private-key").id52, named)

    def test_create_refuses_an_existing_name_and_a_bad_one(self):
        first = ok(self.home, "identity", "create", "work")
        r = run_malai(self.home, "identity", "create", "work")
        self.assertEqual(r.returncode, 1)
        self.assertIn("identity 'work' already exists", r.stderr)
        self.assertEqual(Identity.load(self.folder / "work.private-key").id52, first.strip())  # untouched
        for bad in ("../evil", "Work", ".hidden", "a/b"):
            r = run_malai(self.home, "identity", "create", bad)
            self.assertEqual(r.returncode, 2, bad)
            self.assertIn("is not an identity name", r.stderr)
        self.assertEqual(sorted(p.name for p in self.folder.iterdir()), ["work.private-key"])

    def test_list_shows_each_identity_and_a_key_file_too_open(self):
        a = ok(self.home, "identity", "create", "alpha").strip()
        b = ok(self.home, "identity", "create", "beta").strip()
        os.chmod(self.folder / "beta.private-key", 0o644)
        listed = json.loads(ok(self.home, "identity", "list", "--json"))
        self.assertEqual(listed[0], {"name": "alpha", "id52": a, "problem": None})
        self.assertEqual(listed[1]["name"], "beta")
        self.assertIsNone(listed[1]["id52"])
        self.assertIn("chmod 600", listed[1]["problem"])
        self.assertNotIn(b, json.dumps(listed))
        text = ok(self.home, "identity", "list")
        self.assertIn(f"alpha            {a}", text)
        self.assertIn("beta             unusable:", text)

    def test_export_then_import_moves_the_identity(self):
        id52 = ok(self.home, "identity", "create", "work").strip()
        r = run_malai(self.home, "identity", "export", "work")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("warning: this is the secret key of 'work'", r.stderr)
        self.assertEqual(r.stdout.strip(), Identity.load(self.folder / "work.private-key").secret_hex)
        other = short_home(self)
        self.assertEqual(ok(other, "identity", "import", "moved", input=r.stdout).strip(), id52)
        moved = other / "identities" / "moved.private-key"
        self.assertEqual(stat.S_IMODE(moved.stat().st_mode), 0o600)
        self.assertEqual(Identity.load(moved).id52, id52)
        again = run_malai(other, "identity", "import", "moved", input=KEYS["alice"].secret_hex)
        self.assertEqual(again.returncode, 1)
        self.assertIn("already exists", again.stderr)
        self.assertEqual(Identity.load(moved).id52, id52)  # not replaced
        garbage = run_malai(other, "identity", "import", "junk", input="not a key\n")
        self.assertEqual(garbage.returncode, 1)
        self.assertIn("64 hex characters", garbage.stderr)
        self.assertFalse((other / "identities" / "junk.private-key").exists())

    def test_export_refuses_a_terminal_unless_forced(self):
        ok(self.home, "identity", "create", "work")
        secret = Identity.load(self.folder / "work.private-key").secret_hex
        for extra, code in (((), 1), (("--force",), 0)):
            main, tty = pty.openpty()
            try:
                r = subprocess.run([MALAI, "identity", "export", "work", *extra], stdout=tty, stderr=subprocess.PIPE,
                                   env=dict(os.environ, MALAI_HOME=str(self.home)), text=True, timeout=60)
                os.close(tty)
                shown = _drain(main)
            finally:
                os.close(main)
            self.assertEqual(r.returncode, code, r.stderr)
            if code:
                self.assertIn("not printing the secret key of 'work' to a terminal", r.stderr)
                self.assertNotIn(secret, shown)
            else:
                self.assertIn(secret, shown)

    def test_export_refuses_a_key_file_others_may_read(self):
        ok(self.home, "identity", "create", "work")
        os.chmod(self.folder / "work.private-key", 0o640)
        r = run_malai(self.home, "identity", "export", "work")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, "")
        self.assertIn("readable by others", r.stderr)

    def test_delete(self):
        id52 = ok(self.home, "identity", "create", "work").strip()
        r = run_malai(self.home, "identity", "delete", "work")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(id52, r.stderr)
        self.assertFalse((self.folder / "work.private-key").exists())
        self.assertEqual(json.loads(ok(self.home, "identity", "list", "--json")), [])
        missing = run_malai(self.home, "identity", "delete", "work")
        self.assertEqual(missing.returncode, 1)
        self.assertIn("no identity 'work'", missing.stderr)


def _drain(fd: int) -> str:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO once the terminal's other end is closed
            break
        if not chunk:
            break
        out += chunk
    return out.decode()


class UsageTests(TestCase):
    """Default deny: a share names who may reach it, or does not start."""

    def test_tcp_without_allow_refuses_to_start(self):
        home = short_home(self)
        r = run_malai(home, "tcp", "6379")
        self.assertEqual(r.returncode, 2)
        self.assertIn("refusing to share 127.0.0.1:6379 with nobody", r.stderr)
        self.assertFalse((home / "identities").exists())  # nothing created for a share that never ran

    def test_allow_everyone_is_not_supported(self):
        r = run_malai(short_home(self), "tcp", "6379", "--allow", "*")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--allow '*' is not supported", r.stderr)
        bad = run_malai(short_home(self), "tcp", "6379", "--allow", "nobody")
        self.assertEqual(bad.returncode, 2)
        self.assertIn("is not an ID52", bad.stderr)

    def test_bridge_needs_an_address(self):
        r = run_malai(short_home(self), "tcp-bridge", KEYS["alice"].id52)
        self.assertEqual(r.returncode, 2)
        self.assertIn("pass --addr HOST:PORT", r.stderr)


class StreamAuthorisationTests(SynchronousTestCase):
    """The sharer checks every stream against the verified peer, before any upstream connection."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.me = KEYS["web01"]
        self.share = TcpShare(self.reactor, self.me, "127.0.0.1", 6379, [KEYS["alice"].id52], "tcp:0")

    def request(self, peer: Identity, kind: str = "tcp", target: str = SHARE_TARGET) -> StreamRequest:
        return StreamRequest(PeerAddress(self.me.id52, peer.id52), kind, target)

    def test_a_peer_not_allowed_is_refused(self):
        refused = self.failureResultOf(self.share._answer(self.request(KEYS["mallory"])), StreamRefused).value
        self.assertEqual(refused.code, "NOT_ALLOWED")
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.share.refused, 1)

    def test_another_kind_or_target_is_refused(self):
        for kind, target in (("http", SHARE_TARGET), ("exec", "ls"), ("tcp", "22")):
            refused = self.failureResultOf(self.share._answer(self.request(KEYS["alice"], kind, target)),
                                           StreamRefused).value
            self.assertEqual(refused.code, "BAD_REQUEST")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_an_allowed_peer_connects_the_shared_port(self):
        self.assertNoResult(self.share._answer(self.request(KEYS["alice"])))
        self.assertEqual([(host, port) for host, port, *_ in self.reactor.tcpClients], [("127.0.0.1", 6379)])

    def test_a_link_from_a_stranger_is_not_routed(self):
        self.assertIsNone(self.share._route(PeerAddress(self.me.id52, KEYS["mallory"].id52)))
        self.assertIsNotNone(self.share._route(PeerAddress(self.me.id52, KEYS["alice"].id52)))


def _echo_then_eof(conn) -> None:
    """Echo what comes; after the caller's EOF say ``EOF`` and close."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.sendall(b"EOF")


class _Foreground:
    """A ``malai`` command running in the foreground until SIGINT."""

    def __init__(self, testcase, home: Path, *args: str, until: str):
        self.proc = subprocess.Popen([MALAI, *args], env=dict(os.environ, MALAI_HOME=str(home)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        testcase.addCleanup(self.stop)
        self.lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.kill()
                raise AssertionError(f"malai {' '.join(args)} did not start: {''.join(self.lines)}"
                                     f"{self.proc.stderr.read()}")
            self.lines.append(line)
            if until in line:
                break
        self.err = ""

    def stop(self) -> str:
        """SIGINT (Ctrl-C); what it said on stderr."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                _, self.err = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, self.err = self.proc.communicate()
        return self.err


class ShareEndToEndTests(TestCase):
    """``malai tcp`` shares an echo server with one identity of another MALAI_HOME."""

    def setUp(self):
        self.upstream = _Server(self, _echo_then_eof)
        self.sharer_home, self.friend_home, self.stranger_home = (short_home(self) for _ in range(3))
        self.friend = ok(self.friend_home, "identity", "create", "laptop").strip()
        self.share = self.start_share()

    def start_share(self) -> _Foreground:
        share = _Foreground(self, self.sharer_home, "tcp", str(self.upstream.port), "--allow", self.friend,
                            "--listen", "127.0.0.1:0", until="Ctrl-C to stop")
        self.id52 = share.lines[0].split()[1]
        self.peer_addr = share.lines[1].split()[-1]
        return share

    def bridge(self, home: Path, *extra: str) -> tuple:
        bridge = _Foreground(self, home, "tcp-bridge", self.id52, "--addr", self.peer_addr, *extra,
                             until="tcp-bridge on ")
        host, port = bridge.lines[-1].split()[2].rsplit(":", 1)
        return bridge, (host, int(port))

    def test_an_allowed_bridge_carries_both_ways_with_half_close(self):
        self.assertEqual(self.share.lines[0], f"ID52: {parse_id52(self.id52)}\n")
        self.assertIn(f"allowed: {self.friend}", "".join(self.share.lines))
        bridge, local = self.bridge(self.friend_home, "--identity", "laptop")
        payload = os.urandom(300_000)
        with socket.create_connection(local, timeout=30) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)  # the upstream sees EOF, answers after it
            got = _recv_all(c)
        self.assertEqual(got, payload + b"EOF")
        self.assertEqual(self.upstream.accepted, 1)
        err = bridge.stop()
        self.assertEqual(bridge.proc.returncode, 0, err)
        self.assertIn("stopped after 1 connections", err)
        self.assertTrue(self.share.stop().endswith("stopped after 1 connections (0 refused)\n"))
        self.assertEqual(self.share.proc.returncode, 0)

    def test_the_id52_stays_the_same_across_restarts(self):
        first = self.id52
        self.share.stop()
        self.start_share()
        self.assertEqual(self.id52, first)
        listed = json.loads(ok(self.sharer_home, "identity", "list", "--json"))
        self.assertEqual(listed, [{"name": "default", "id52": first, "problem": None}])

    def test_a_bridge_not_allowed_is_refused_and_the_upstream_sees_nothing(self):
        bridge, local = self.bridge(self.stranger_home)  # its `default` identity, created on first use
        stranger = Identity.load(self.stranger_home / "identities" / "default.private-key").id52
        with socket.create_connection(local, timeout=30) as c:
            c.sendall(b"hello")
            try:
                got = _recv_all(c)
            except ConnectionResetError:
                got = b""
        self.assertEqual(got, b"")
        self.assertEqual(self.upstream.accepted, 0)
        err = bridge.stop()
        self.assertIn(f"does not allow this identity ({stranger}); its owner adds --allow {stranger}", err)
        share_err = self.share.stop()
        self.assertIn(f"refused a link from {stranger}", share_err)
        self.assertEqual(self.upstream.accepted, 0)

    def test_a_strangers_raw_tls_link_is_closed_after_the_handshake(self):
        stranger = KEYS["mallory"]
        closed = self.handshake(stranger)
        self.assertTrue(closed, "the stranger's link stayed open")
        friend = Identity.load(self.friend_home / "identities" / "laptop.private-key")
        self.assertFalse(self.handshake(friend), "the allowed identity's link was closed")
        self.assertEqual(self.upstream.accepted, 0)
        self.assertIn(f"refused a link from {stranger.id52}", self.share.stop())

    def handshake(self, identity: Identity) -> bool:
        """Complete a TLS handshake as ``identity``; whether the sharer then closes the link within 2 s."""
        context = PeerTLS().client_for(identity, self.id52).context
        host, port = self.peer_addr.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=10)
        tls = SSL.Connection(context, sock)
        tls.set_verify(SSL.VERIFY_PEER, lambda *_: True)  # a raw client: it does not check the sharer
        tls.set_tlsext_host_name(self.id52.encode())
        tls.set_alpn_protos([ALPN])
        tls.set_connect_state()
        sock.setblocking(True)
        try:
            tls.do_handshake()
            deadline = time.monotonic() + 2
            while select.select([sock], [], [], max(0, deadline - time.monotonic()))[0]:
                try:
                    return tls.recv(1) == b""  # bytes: the link speaks (HTTP/2 SETTINGS)
                except SSL.WantReadError:
                    continue  # a TLS record that carried no data (a session ticket)
                except (SSL.ZeroReturnError, SSL.SysCallError, ConnectionResetError):
                    return True
            return False  # still open, silent
        finally:
            sock.close()
