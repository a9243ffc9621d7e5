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
