"""A machine's link to its manager, as a new user meets it (#17 item 2): with no address, status says
so and what to do; re-running ``machine init`` with ``--addr`` fixes it; after the manager restarts
the machine logs the lost link and links again within seconds."""

import time

from twisted.trial.unittest import TestCase

from tests.helpers import DaemonHome, free_port, wait_for


def _id52(out: str, label: str) -> str:
    return out.split(f"{label} ID52: ")[1].split()[0]


class ManagerLinkTests(TestCase):
    def setUp(self):
        self.cm, self.web = DaemonHome(self), DaemonHome(self)
        self.cm_id52 = _id52(self.cm.ok("cluster", "init", "company"), "manager")
        self.port = free_port()
        self.cm.start(f"tcp:{self.port}:interface=127.0.0.1")

    def add(self, web_id52: str) -> None:
        config = self.cm.root / "clusters" / "company" / "cluster.toml"
        config.write_text(config.read_text() + f'\n[machine.web01]\nid52 = "{web_id52}"\n')
        self.cm.ok("rescan", "company")

    def in_sync(self) -> bool:
        return any(m["sync"] == "in sync" for m in self.cm.status()["clusters"][0]["sync"])

    def test_no_address_is_named_and_a_rerun_with_addr_fixes_it(self):
        web_id52 = _id52(self.web.ok("machine", "init", self.cm_id52, "company", "--name", "web01"), "machine")
        self.add(web_id52)
        self.web.start()
        wait_for(lambda: "manager unreachable: no address for the manager" in self.web.ok("status"), 10,
                 "status to say there is no address for the manager")
        self.assertIn("--addr HOST:PORT", self.web.ok("status"))
        out = self.web.ok("machine", "init", self.cm_id52, "company", "--addr", f"127.0.0.1:{self.port}")
        self.assertIn(f"the manager's addresses are now 127.0.0.1:{self.port}", out)
        self.assertIn('name = "web01"', (self.web.root / "clusters" / "company" / "cluster-info.toml").read_text())
        wait_for(self.in_sync, 15, "web01 to take its config once it has the address")
        self.assertNotIn("manager unreachable", self.web.ok("status"))
        r = self.web.malai("machine", "init", "1" * 51 + "g", "company", "--addr", "127.0.0.1:1")
        self.assertEqual(r.returncode, 1)
        self.assertIn(f"has manager {self.cm_id52}", r.stderr)  # another cluster's manager: refused

    def test_relinks_within_seconds_of_the_managers_return(self):
        out = self.web.ok("machine", "init", self.cm_id52, "company", "--name", "web01",
                          "--addr", f"127.0.0.1:{self.port}")
        self.add(_id52(out, "machine"))
        self.web.start()
        wait_for(self.in_sync, 15, "web01 to take its config")
        self.cm.ok("stop")
        wait_for(lambda: "lost the link to the manager" in self.web.ok("logs", "--level", "warn"), 10,
                 "web01 to log the lost link")
        time.sleep(15)  # long enough for the backoff to reach its longest step
        self.cm.start(f"tcp:{self.port}:interface=127.0.0.1")
        back = time.monotonic()
        wait_for(lambda: any(link["peer"] == "manager" for link in self.web.status()["clusters"][0]["peer_links"])
                 and "linked to the manager" in self.web.ok("logs", "-n", "5"), 15, "web01 to link again")
        self.assertLess(time.monotonic() - back, 7.0)
