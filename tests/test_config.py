"""Config files: parsing with every error at once, rendering, personalization."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from malai.config import (
    ConfigError,
    parse_cluster,
    parse_cluster_info,
    parse_device,
    parse_machine_config,
    personalize,
    render_cluster,
    render_cluster_info,
    render_machine_config,
)
from malai.config.locate import KeyLocator
from malai.config.models import ClusterInfo, LinkLimits
from malai.errors import MalaiError
from tests.helpers import KEYS, cluster_text


def problems(parse, text, file="f.toml"):
    try:
        parse(text, file)
    except ConfigError as e:
        return [str(p) for p in e.problems]
    raise AssertionError("no ConfigError")


class ClusterParseTests(SynchronousTestCase):
    def test_sample(self):
        c = parse_cluster(cluster_text())
        self.assertEqual(c.manager.cluster_name, "company")
        self.assertEqual(set(c.machines), {"web01", "db01", "laptop"})
        web = c.machines["web01"]
        self.assertEqual(web.addrs, ("127.0.0.1:7421",))
        self.assertEqual(web.commands["restart-nginx"].username, "root")
        self.assertEqual(web.http["admin"].port, 8080)
        self.assertTrue(web.http["admin"].inject_headers)
        self.assertEqual(c.machines["db01"].tcp["mysql"].host, "127.0.0.1")

    def test_render_round_trips(self):
        c = parse_cluster(cluster_text())
        self.assertEqual(parse_cluster(render_cluster(c)), c)

    def test_every_error_at_once_with_lines(self):
        text = cluster_text(
            'colour = "blue"\n'          # line 38: unknown key in machine.laptop
            '[machine.bad]\n'            # line 39
            'id52 = "nope"\n'            # line 40
            'addrs = ["nohost"]\n'       # line 41
            '[machine.bad.tcp.x]\n'      # line 42
            'port = 70000\n'             # line 43
        )
        got = problems(parse_cluster, text, "cluster.toml")
        self.assertIn("cluster.toml:38: machine.laptop.colour: unknown key", got)
        self.assertTrue(any(p.startswith("cluster.toml:40: machine.bad.id52: 'nope' is not an ID52") for p in got), got)
        self.assertTrue(any(p.startswith("cluster.toml:41: machine.bad.addrs: 'nohost' is not an address") for p in got), got)
        self.assertIn("cluster.toml:43: machine.bad.tcp.x.port: must be from 1 to 65535, not 70000", got)
        self.assertEqual(len(got), 4, got)

    def test_missing_required(self):
        got = problems(parse_cluster, '[cluster_manager]\ncluster_name = "x"\n', "c.toml")
        self.assertEqual(got, ["c.toml:1: cluster_manager.id52: missing; a string is required"])
        got = problems(parse_cluster, "", "c.toml")
        self.assertEqual(got, ["c.toml:1: cluster_manager: missing; a table is required"])

    def test_wrong_types(self):
        text = cluster_text('allow_from = 3\n[machine.web01.http.admin2]\nport = "80"\ninject_headers = "yes"\n')
        got = problems(parse_cluster, text)
        self.assertIn("f.toml:38: machine.laptop.allow_from: must be a string, not an integer", got)
        self.assertIn("f.toml:40: machine.web01.http.admin2.port: must be an integer, not a string", got)
        self.assertIn("f.toml:41: machine.web01.http.admin2.inject_headers: must be true or false, not a string", got)

    def test_syntax_error_has_line(self):
        got = problems(parse_cluster, '[cluster_manager]\nid52 = "x\n', "c.toml")
        self.assertEqual(len(got), 1)
        self.assertTrue(got[0].startswith("c.toml:2: TOML syntax error"), got)

    def test_unknown_reference_and_cycle(self):
        text = cluster_text('[group.a]\nmembers = "b"\n[group.b]\nmembers = "c, a"\n[group.c]\nmembers = "nobody"\n')
        got = problems(parse_cluster, text)
        self.assertEqual(got, [
            "f.toml:39: group.a.members: group cycle: a → b → a",
            "f.toml:43: group.c.members: unknown name 'nobody': not a group, a machine, '*' or an ID52",
        ])

    def test_unknown_name_in_machine_rule_names_chain(self):
        text = cluster_text('[group.ops]\nmembers = "ghost"\n').replace('allow_from = "admins"\nusername', 'allow_from = "ops"\nusername')
        got = problems(parse_cluster, text)
        self.assertEqual(got, ["f.toml:39: group.ops.members: unknown name 'ghost': not a group, a machine, '*' or an ID52"])

    def test_duplicate_id52_and_name_clash(self):
        text = cluster_text(f'[machine.other]\nid52 = "{KEYS["web01"].id52}"\n[group.laptop]\nmembers = "*"\n')
        got = problems(parse_cluster, text)
        self.assertIn("f.toml:39: machine.other.id52: same ID52 as machine web01", got)
        self.assertTrue(any("'laptop' is both a machine and a group name" in p for p in got), got)

    def test_bad_names(self):
        got = problems(parse_cluster, cluster_text('[machine.Web_1]\nid52 = "x"\n'))
        self.assertTrue(any("machine.Web_1: 'Web_1' is not a valid name" in p for p in got), got)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=400))
    def test_arbitrary_text_raises_only_config_error(self, text):
        for parse in (parse_cluster, parse_machine_config, parse_cluster_info, parse_device):
            try:
                parse(text, "x.toml")
            except ConfigError:
                pass

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_mutated_sample_raises_only_config_error(self, data):
        text = cluster_text()
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 20)))
        new = data.draw(st.text(alphabet='[]."=, \n#abcxyz0123', max_size=10))
        try:
            parse_cluster(text[:i] + new + text[j:])
        except ConfigError:
            pass


class PersonalizeTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = parse_cluster(cluster_text())
        self.k = {n: i.id52 for n, i in KEYS.items()}

    def test_web01_subtree_expanded(self):
        mc = personalize(self.cluster, "web01")
        self.assertEqual(mc.machine.allow_from, ", ".join(sorted([self.k["alice"], self.k["laptop"]])))
        self.assertEqual(mc.machine.commands["restart-nginx"].allow_from, self.k["laptop"])
        self.assertEqual(mc.machine.username, "deploy")
        self.assertEqual(mc.callers, {"laptop": self.k["laptop"]})
        self.assertIsNone(mc.manager.config_editors)
        # web01 may reach db01's mysql, nothing else
        self.assertEqual(list(mc.directory), ["db01"])
        self.assertEqual(mc.directory["db01"].tcp, ("mysql",))
        self.assertFalse(mc.directory["db01"].exec)

    def test_nothing_else_leaks(self):
        text = render_machine_config(personalize(self.cluster, "web01"))
        for secret in ("admins", "devops", "3306" , "db01.tcp", "allow_shell", "group"):
            self.assertNotIn(secret, text)
        self.assertNotIn("laptop]", text)

    def test_client_directory(self):
        mc = personalize(self.cluster, "laptop")
        self.assertEqual(set(mc.directory), {"web01", "db01"})
        web = mc.directory["web01"]
        self.assertTrue(web.exec and web.shell)
        self.assertEqual(web.commands, ("restart-nginx",))
        self.assertEqual(web.http, ("admin",))
        self.assertEqual(web.addrs, ("127.0.0.1:7421",))
        self.assertFalse(mc.directory["db01"].shell)  # allow_shell is alice only

    def test_round_trip(self):
        for name in self.cluster.machines:
            mc = personalize(self.cluster, name)
            self.assertEqual(parse_machine_config(render_machine_config(mc)), mc)

    def test_relays_listed_and_members_only_for_a_relay(self):
        cluster = parse_cluster(cluster_text().replace('[machine.laptop]\nid52 = "' + self.k["laptop"] + '"',
                                                       '[machine.laptop]\nid52 = "' + self.k["laptop"] + '"'
                                                       '\nrelay = true\naddrs = ["10.0.0.9:7420"]'))
        web = personalize(cluster, "web01")
        self.assertEqual(list(web.relays), ["laptop"])
        self.assertEqual((web.relays["laptop"].id52, web.relays["laptop"].addrs), (self.k["laptop"], ("10.0.0.9:7420",)))
        self.assertEqual(web.members, {})  # only a relay learns every member
        relay = personalize(cluster, "laptop")
        self.assertEqual(relay.relays, {})
        self.assertEqual(relay.members, {m.name: m.id52 for m in cluster.machines.values()})
        for mc in (web, relay):
            self.assertEqual(parse_machine_config(render_machine_config(mc)), mc)

    def test_unknown_machine(self):
        e = self.assertRaises(MalaiError, personalize, self.cluster, "nope")
        self.assertIn("no machine 'nope'", str(e))


class OtherFilesTests(SynchronousTestCase):
    def test_cluster_info_round_trip(self):
        info = ClusterInfo("company", KEYS["cm"].id52, ("127.0.0.1:7420",), "web01")
        self.assertEqual(parse_cluster_info(render_cluster_info(info)), info)

    def test_device(self):
        d = parse_device('[aliases]\nweb = "web01.company ps aux"\n[tcp.mysql]\nlocal = "127.0.0.1:3306"\n'
                         'remote = "mysql.db01.company"\n[http]\nlisten = "127.0.0.1:8080"\n'
                         '[daemon]\nlisten = ["tcp:7420"]\n')
        self.assertEqual(d.aliases, {"web": "web01.company ps aux"})
        self.assertEqual(d.tcp["mysql"].remote, "mysql.db01.company")
        self.assertEqual(d.http_listen, "127.0.0.1:8080")
        self.assertEqual(d.listen, ("tcp:7420",))

    def test_link_limits(self):
        self.assertEqual(parse_device("").links, LinkLimits(4096, 5, 10))
        d = parse_device("[links]\nmax_streams = 100\nping_interval = 2\ndrain_time = 60\n")
        self.assertEqual(d.links, LinkLimits(100, 2, 60))
        got = problems(parse_device, "[links]\nmax_streams = 0\nping_interval = 1.5\nbuffer = 3\n", "malai.toml")
        self.assertEqual(got, ["malai.toml:2: links.max_streams: must be from 1 to 1048576, not 0",
                               "malai.toml:3: links.ping_interval: must be an integer, not a number",
                               "malai.toml:4: links.buffer: unknown key"])

    def test_alias_shadowing_subcommand(self):
        got = problems(parse_device, '[aliases]\nok = "a.b"\nstatus = "web01.company uptime"\n', "malai.toml")
        self.assertEqual(got, ["malai.toml:3: aliases.status: alias 'status' would shadow the `malai status` command; rename it"])

    def test_device_errors(self):
        got = problems(parse_device, '[tcp.x]\nlocal = "3306"\nremote = "db01.company"\n', "m.toml")
        self.assertEqual(len(got), 2, got)
        self.assertTrue(got[0].startswith("m.toml:2: tcp.x.local:"))
        self.assertTrue(got[1].startswith("m.toml:3: tcp.x.remote:"))


class LocatorTests(SynchronousTestCase):
    def test_lines(self):
        text = '# c\n[a]\nx = [\n 1, # ]\n 2]\ns = """\nfake = 1\n"""\n"q.k".z = 1\n[a.b."c"]\ny = 1\n'
        lines = KeyLocator(text).lines
        self.assertEqual(lines[("a", "x")], 3)
        self.assertNotIn(("a", "fake"), lines)
        self.assertEqual(lines[("a", "q.k", "z")], 9)
        self.assertEqual(lines[("a", "b", "c", "y")], 11)
        self.assertEqual(KeyLocator(text).line_of(("a", "b", "c", "missing")), 10)
