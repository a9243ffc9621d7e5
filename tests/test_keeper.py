"""LinkKeeper's states with a Clock and a fake pool: dial, heartbeat, backoff, re-dial."""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from malai.peer.commands import Ping
from malai.services.keeper import RETRY_FIRST, LinkKeeper


class FakeLink:
    def __init__(self):
        self.closed = Deferred()
        self.peer = type("Peer", (), {"hint": "tcp:manager:7420"})()
        self.pings = 0

    def callRemote(self, command, payload):
        assert command is Ping
        self.pings += 1
        return succeed({"payload": payload, "version": "test"})


class FakePool:
    def __init__(self):
        self.answers = []
        self.asked = 0

    def get(self, identity, peer):
        self.asked += 1
        answer = self.answers.pop(0)
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


class KeeperTests(SynchronousTestCase):
    def setUp(self):
        self.clock, self.pool = Clock(), FakePool()
        cluster = type("Cluster", (), {"name": "company", "identity": None})()
        self.keeper = LinkKeeper(self.clock, cluster, self.pool, "manager-id52", "the manager", heartbeat=60)

    def test_dial_heartbeat_backoff_and_redial(self):
        link = FakeLink()
        self.pool.answers = [ConnectionRefusedError("refused"), ConnectionRefusedError("refused"), link, link]
        self.keeper.start()
        self.clock.advance(0)  # first dial: refused
        self.clock.advance(RETRY_FIRST)  # second, after 1 s: refused
        self.assertEqual((self.pool.asked, self.keeper.link), (2, None))
        self.clock.advance(RETRY_FIRST)  # not yet: the backoff doubled
        self.assertEqual(self.pool.asked, 2)
        self.clock.advance(RETRY_FIRST)
        self.assertIs(self.keeper.link, link)
        self.assertEqual(link.pings, 1)
        self.clock.advance(60)  # heartbeat
        self.assertEqual(link.pings, 2)
        fresh = FakeLink()
        self.pool.answers = [fresh]
        link.closed.callback(link)  # the link drops: re-dial after the (reset) backoff
        self.assertIsNone(self.keeper.link)
        self.clock.advance(RETRY_FIRST)
        self.assertIs(self.keeper.link, fresh)

    def test_stop_cancels_everything(self):
        self.pool.answers = [FakeLink()]
        self.keeper.start()
        self.keeper.stop()
        self.clock.advance(100)
        self.assertEqual(self.pool.asked, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ProbeTests(SynchronousTestCase):
    """The keeper's probe (a heartbeat to the manager): its timing, a hurried one, the round trip."""

    def setUp(self):
        self.clock, self.pool = Clock(), FakePool()
        self.answers = []  # Deferreds handed to the probes, in order
        cluster = type("Cluster", (), {"name": "company", "identity": None})()
        self.keeper = LinkKeeper(self.clock, cluster, self.pool, "manager-id52", "the manager", heartbeat=10,
                                 probe=self.probe)
        self.link = FakeLink()
        self.pool.answers = [self.link] * 10

    def probe(self, link):
        d = Deferred()
        self.answers.append((self.clock.seconds(), d))
        return d

    def answer(self, after: float = 0.0):
        self.clock.advance(after)
        self.answers[-1][1].callback({})

    def test_a_probe_every_interval_timed_from_the_last_answer(self):
        self.keeper.start()
        self.clock.advance(0)
        self.answer(0.25)
        self.assertEqual((self.keeper.link, self.keeper.rtt), (self.link, 0.25))
        self.clock.advance(9.9)
        self.assertEqual(len(self.answers), 1)
        self.clock.advance(0.1)
        self.assertEqual([at for at, _ in self.answers], [0, 10.25])
        self.answer(0.5)
        self.clock.advance(10)
        self.assertEqual([at for at, _ in self.answers], [0, 10.25, 20.75])
        self.assertEqual(self.link.pings, 0)  # the probe replaced the ping

    def test_hurry_probes_at_once_and_restarts_the_interval(self):
        self.keeper.start()
        self.clock.advance(0)
        self.answer()
        self.clock.advance(4)
        self.keeper.hurry()
        self.assertEqual([at for at, _ in self.answers], [0, 4])
        self.keeper.hurry()  # one is under way already: nothing more
        self.assertEqual(len(self.answers), 2)
        self.answer()
        self.clock.advance(9.9)  # the tick scheduled before the hurry was cancelled
        self.assertEqual(len(self.answers), 2)
        self.clock.advance(0.1)
        self.assertEqual([at for at, _ in self.answers], [0, 4, 14])

    def test_a_changed_interval_applies_from_the_next_answer(self):
        self.keeper.start()
        self.clock.advance(0)
        self.keeper.heartbeat = 1
        self.answer()
        self.clock.advance(1)
        self.assertEqual([at for at, _ in self.answers], [0, 1])

    def test_a_probe_that_fails_is_a_lost_link(self):
        self.keeper.start()
        self.clock.advance(0)
        self.answers[-1][1].errback(ConnectionRefusedError("gone"))
        self.assertIsNone(self.keeper.link)
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(len(self.answers), 2)
