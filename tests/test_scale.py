"""#21: a manager of 1,000 machines (real daemons on loopback: the manager, and two daemons holding
500 machine identities each) keeps answering while it pushes, and every machine gets every change."""

import re
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.atomic import write_atomic
from malai.config import parse_cluster, parse_machine_config
from malai.config.cluster_info import render_cluster_info
from malai.config.models import ClusterInfo
from malai.config.store import ClusterStore
from malai.control.client import call
from malai.control.commands import Rescan, Status
from malai.identity import Identity
from malai.services import publisher as publishing
from tests.helpers import KEYS, DaemonHome, free_port

MACHINES, DAEMONS = 1000, 2
APPLIED = re.compile(r"\] (m\d+): config version (\d+) from the manager")


class ThousandMachinesTests(TestCase):
    timeout = 300

    def setUp(self):
        self.cm = DaemonHome(self)
        cm_id52 = self.cm.ok("cluster", "init", "company").split("manager ID52: ")[1].split()[0]
        self.cm_addr = f"127.0.0.1:{free_port()}"
        self.daemons = [DaemonHome(self) for _ in range(DAEMONS)]
        self.folders, self.ids = {}, {}
        entries = []
        for i in range(MACHINES):
            identity = Identity.generate()
            folder = self.daemons[i % DAEMONS].root / "clusters" / f"m{i}"
            folder.mkdir(parents=True)
            identity.save(folder / "machine.private-key")
            write_atomic(folder / "cluster-info.toml",
                         render_cluster_info(ClusterInfo(f"m{i}", cm_id52, (self.cm_addr,), f"m{i}")).encode())
            entries.append(f'\n[machine.m{i}]\nid52 = "{identity.id52}"\nallow_from = "m0"\n')
            self.folders[f"m{i}"], self.ids[f"m{i}"] = folder, identity.id52
        self.config = self.cm.root / "clusters" / "company" / "cluster.toml"
        self.config.write_text(self.config.read_text() + "".join(entries))
        self.slowest = 0.0  # the longest the control socket took to answer Status
        self.status: dict = {}
        self.version = 0  # the manager's config version

    @inlineCallbacks
    def poll_status(self):
        start = time.monotonic()
        answer = yield call(reactor, self.cm.root / "malai.socket", Status, timeout=10)
        self.slowest = max(self.slowest, time.monotonic() - start)
        self.version = answer["clusters"][0]["config_version"]
        self.status = {m["machine"]: m for m in answer["clusters"][0]["sync"]}

    @inlineCallbacks
    def until_in_sync(self, version: int, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            done = sum(1 for m in self.status.values() if m["sync"] == "in sync" and m["version"] == version)
            if done == MACHINES:
                return
            if time.monotonic() > deadline:
                self.fail(f"{done} of {MACHINES} machines acked version {version} within {timeout:g}s")
            yield deferLater(reactor, 0.2, lambda: None)

    @inlineCallbacks
    def rescan(self, old: str, new: str):
        self.config.write_text(self.config.read_text().replace(old, new))
        yield call(reactor, self.cm.root / "malai.socket", Rescan, check=False, timeout=10)

    @inlineCallbacks
    def test_every_machine_acks_each_change_while_status_answers(self):
        port = self.cm_addr.rsplit(":", 1)[1]
        start = time.monotonic()
        self.cm.start(f"tcp:{port}:interface=127.0.0.1")
        self.assertLess(time.monotonic() - start, 10, "the manager of 1,000 machines took long to serve")
        for home in self.daemons:
            home.start()
        poller = LoopingCall(self.poll_status)
        done = poller.start(0.25)
        self.addCleanup(lambda: poller.running and poller.stop())
        yield self.poll_status()
        first = self.version
        yield self.until_in_sync(first, 120)
        # two changes, the second while the first is on its way: every machine ends with the second
        yield self.rescan('allow_from = "m0"', 'allow_from = "m0, m1"')
        yield deferLater(reactor, 0.3, lambda: None)
        yield self.rescan('allow_from = "m0, m1"', 'allow_from = "m1"')
        last = first + 2
        yield self.until_in_sync(last, 120)
        poller.stop()
        yield done
        self.assertLess(self.slowest, 1.0, "the manager's control socket answered Status that slowly")
        for name, folder in self.folders.items():
            config = parse_machine_config((folder / "machine.toml").read_text())
            self.assertEqual((config.version, config.machine.allow_from), (last, self.ids["m1"]), name)
        out = self.cm.ok("status")  # counts, at most ten links and laggards named: not a line per machine
        self.assertIn(f"machines: {MACHINES} in sync, 0 pending, 0 failing", out)
        self.assertLess(len(out.splitlines()), 20, out)
        # no machine applied a version older than one it had: each applied its versions in order
        applied = defaultdict(list)
        for home in self.daemons:
            for line in (home.root / "log" / "malai.log").read_text().splitlines():
                match = APPLIED.search(line)
                if match:
                    applied[match[1]].append(int(match[2]))
        self.assertEqual(set(applied), set(self.folders))
        for name, versions in applied.items():
            self.assertEqual(versions, sorted(set(versions)), name)
            self.assertEqual((versions[0], versions[-1]), (first, last), name)


class FakeLink:
    """Answers each PushConfig when the test says so."""

    def __init__(self, pushes: list):
        self.pushes = pushes

    def callRemote(self, command, **kwargs):
        d = Deferred()
        self.pushes.append((kwargs, d))
        return d


class PublisherTests(SynchronousTestCase):
    """The publisher on a fake clock and fake links: made a slice at a time, at most IN_FLIGHT pushes
    waiting, retries spread out, state.json written at most once a second."""

    def setUp(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        KEYS["cm"].save(folder / "cluster.private-key")
        self.text = (f'[cluster_manager]\nid52 = "{KEYS["cm"].id52}"\ncluster_name = "company"\n' + "".join(
            f'\n[machine.m{i}]\nid52 = "{Identity.generate().id52}"\nallow_from = "m0"\n' for i in range(300)))
        (folder / "cluster.toml").write_text(self.text)
        self.clock, self.pushes, self.failing = Clock(), [], False
        pool = SimpleNamespace(get=lambda identity, peer: (
            fail(ConnectionError("unreachable")) if self.failing else succeed(FakeLink(self.pushes))))
        self.cluster = SimpleNamespace(name="company", identity=KEYS["cm"], daemon=None,
                                       entry=SimpleNamespace(cluster=parse_cluster(self.text)))
        self.store = ClusterStore(folder)
        self.saves = []
        save = self.store.save_state
        self.store.save_state = lambda state: (self.saves.append(self.clock.seconds()), save(state))
        self.publisher = publishing.ConfigPublisher(self.clock, self.cluster, pool, self.store)

    def run_reactor(self, seconds: float = 0.0, step: float = 0.01):
        for _ in range(int(seconds / step) + 1):
            self.clock.advance(step)

    def test_pushes_in_flight_are_bounded_and_each_answer_sends_the_next(self):
        self.publisher.startService()
        self.saves.clear()  # the store's, accepting cluster.toml
        self.assertEqual(self.pushes, [])  # nothing made inside the rescan that started it
        self.assertTrue(self.publisher.publishing())
        self.run_reactor(1)
        self.assertFalse(self.publisher.publishing())
        self.assertEqual(len(self.pushes), publishing.IN_FLIGHT)
        answered = 0
        while answered < len(self.pushes):
            kwargs, d = self.pushes[answered]
            d.callback({"sha256": kwargs["sha256"]})
            answered += 1
            self.assertLessEqual(len(self.pushes) - answered, publishing.IN_FLIGHT)
            self.run_reactor(0.01)
        self.assertEqual(answered, 300)
        self.assertEqual({m["sync"] for m in self.publisher.sync_state()}, {"in sync"})
        self.run_reactor(2)
        gaps = [b - a for a, b in zip(self.saves, self.saves[1:], strict=False)]
        self.assertGreater(len(self.saves), 0)
        self.assertGreaterEqual(min(gaps, default=1.0), 0.99)  # 300 acks, at most one write a second
        self.assertEqual(self.store.load_state()["machines"]["m7"]["version"], self.store.current().version)

    def test_retries_back_off_with_jitter(self):
        self.failing = True
        self.publisher.startService()
        self.run_reactor(0.1)  # made and pushed; every push failed
        delays = sorted(call.getTime() for call in self.publisher.retry.values())
        self.assertEqual(len(delays), 300)
        self.assertTrue(0.5 <= delays[0] and delays[-1] <= 1.6, delays)  # 1 s, jittered ×0.5–1.5
        self.assertGreater(delays[-1] - delays[0], 0.5)  # spread out, not all at once
        self.run_reactor(1.5)  # each retried once or twice: the next wait doubled
        self.assertIn(4.0, set(self.publisher.backoff.values()))
        self.assertLessEqual(set(self.publisher.backoff.values()), {4.0, 8.0})
        saves = len(self.saves)
        self.run_reactor(10)  # failing again as before changes nothing to write
        self.assertEqual(len(self.saves), saves)
