"""ACL decisions: default deny, groups, commands, shells, services, editors, run-as."""

from twisted.trial.unittest import SynchronousTestCase

from malai.acl import Acl, run_as
from malai.config import parse_cluster, personalize
from tests.helpers import KEYS, cluster_text

K = {n: i.id52 for n, i in KEYS.items()}


class ClusterAclTests(SynchronousTestCase):
    def setUp(self):
        self.config = parse_cluster(cluster_text(
            '[group.everyone]\nmembers = "*"\n[machine.open]\nid52 = "%s"\nallow_from = "everyone"\n' % KEYS["mallory"].id52
        ).replace(f'[machine.laptop]\nid52 = "{K["laptop"]}"\n', f'[machine.laptop]\nid52 = "{K["laptop"]}"\n\n'))
        self.acl = Acl.for_cluster(self.config)
        self.web = self.config.machines["web01"]
        self.db = self.config.machines["db01"]

    def test_nested_groups(self):
        d = self.acl.can_run(self.web, K["laptop"], ["ls"])
        self.assertTrue(d)
        self.assertEqual(d.rule, "machine.web01.allow_from")
        self.assertIn("machine admins → devops → laptop", d.reason)
        d = self.acl.can_run(self.web, K["alice"], ["ls"])
        self.assertTrue(d)
        self.assertIn("ID52 listed via admins", d.reason)

    def test_default_deny(self):
        d = self.acl.can_run(self.config.machines["laptop"], K["alice"], ["ls"])
        self.assertFalse(d)
        self.assertIn("machine.laptop.allow_from is not set, so nobody is allowed", str(d))
        d = self.acl.can_run(self.web, K["mallory"], ["ls"])
        self.assertFalse(d)
        self.assertIn(f"open ({K['mallory']}) is not in machine.web01.allow_from = 'admins'", d.reason)

    def test_command_entry_governed_by_its_own_rule(self):
        # alice is an admin but not devops: the entry's allow_from alone decides
        d = self.acl.can_run(self.web, K["alice"], ["restart-nginx"])
        self.assertFalse(d)
        self.assertEqual(d.rule, "machine.web01.command.restart-nginx.allow_from")
        self.assertTrue(self.acl.can_run(self.web, K["laptop"], ["restart-nginx"]))
        d = self.acl.can_run(self.web, K["laptop"], ["restart-nginx", "now"])  # no args = true: no extra words
        self.assertEqual((d.allowed, d.rule), (False, "machine.web01.command.restart-nginx.args"))

    def test_shell(self):
        self.assertTrue(self.acl.can_run(self.db, K["alice"], []))
        self.assertFalse(self.acl.can_run(self.db, K["laptop"], []))  # allow_from but not allow_shell
        d = self.acl.can_run(self.web, K["laptop"], [])
        self.assertTrue(d)
        self.assertIn("allow_shell defaults to it", d.rule)

    def test_star_is_every_member(self):
        open_ = self.config.machines["open"]
        for name in ("cm", "web01", "laptop", "mallory"):
            self.assertTrue(self.acl.can_run(open_, K[name], ["id"]), name)
        self.assertFalse(self.acl.can_run(open_, K["alice"], ["id"]))  # alice is not a machine

    def test_services(self):
        self.assertTrue(self.acl.can_reach(self.db, "tcp", "mysql", K["web01"]))
        self.assertTrue(self.acl.can_reach(self.db, "tcp", "mysql", K["laptop"]))
        self.assertFalse(self.acl.can_reach(self.db, "tcp", "mysql", K["alice"]))
        d = self.acl.can_reach(self.db, "http", "mysql", K["laptop"])
        self.assertFalse(d)
        self.assertIn("no http service 'mysql'", d.reason)
        self.assertTrue(self.acl.can_reach(self.web, "http", "admin", K["alice"]))

    def test_config_editors(self):
        self.assertTrue(self.acl.can_edit_config(self.config.manager.config_editors, K["alice"]))
        self.assertFalse(self.acl.can_edit_config(self.config.manager.config_editors, K["web01"]))
        self.assertFalse(self.acl.can_edit_config(None, K["alice"]))

    def test_run_as(self):
        self.assertEqual(run_as(self.web, ["restart-nginx"]), "root")
        self.assertEqual(run_as(self.web, ["ls"]), "deploy")
        self.assertEqual(run_as(self.web, []), "deploy")
        self.assertIsNone(run_as(self.db, ["ls"]))


class MachineAclTests(SynchronousTestCase):
    """The machine decides from its personalized config alone."""

    def setUp(self):
        self.mc = personalize(parse_cluster(cluster_text()), "web01")
        self.acl = Acl.for_machine(self.mc)

    def test_same_decisions_as_cluster(self):
        cluster = parse_cluster(cluster_text())
        cacl = Acl.for_cluster(cluster)
        for caller in K.values():
            for argv in ([], ["ls"], ["restart-nginx"]):
                self.assertEqual(
                    self.acl.can_run(self.mc.machine, caller, argv).allowed,
                    cacl.can_run(cluster.machines["web01"], caller, argv).allowed,
                )
            self.assertEqual(
                self.acl.can_reach(self.mc.machine, "http", "admin", caller).allowed,
                cacl.can_reach(cluster.machines["web01"], "http", "admin", caller).allowed,
            )

    def test_explains_with_caller_names(self):
        d = self.acl.can_run(self.mc.machine, K["laptop"], ["restart-nginx"])
        self.assertTrue(d)
        self.assertIn(f"laptop ({K['laptop']})", d.reason)
