"""Prometheus metrics (#16 item 3) with real daemons: a manager and web01 serve /metrics, web02 may run
commands on web01, the manager may not."""

import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase, TestCase

from malai.audit import AuditLog
from malai.config import ConfigError
from malai.config.device import parse_device
from malai.services.metrics import Metrics
from tests.helpers import free_port, wait_for
from tests.test_heartbeats import HeartbeatCluster


def scrape(port: int) -> dict:
    """{(name, labels as a sorted tuple): value} from /metrics, parsed by prometheus_client."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def serve_metrics(home, port) -> None:
    with open(home.root / "malai.toml", "a") as f:
        f.write(f'\n[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
    out = home.ok("rescan")
    assert "metrics: added" in out, out


class MetricsTests(TestCase):
    def test_counters_move_when_a_command_runs_and_when_one_is_denied(self):
        c = HeartbeatCluster(self)
        ports = {"cm": free_port(), "web01": free_port()}
        serve_metrics(c.cm, ports["cm"])
        serve_metrics(c.web01, ports["web01"])
        before = scrape(ports["web01"])
        self.assertTrue(all(name.startswith("malai_") for name, _ in before), sorted({n for n, _ in before}))
        self.assertEqual(c.web02.malai("web01.company", "true").returncode, 0)
        denied = c.cm.malai("web01.company", "true")
        self.assertEqual(denied.returncode, 126, denied.stderr)
        wait_for(lambda: value(scrape(ports["web01"]), "malai_denials_total", cluster="company", kind="exec",
                               reason="denied") == 1, 5, "the denial counted")
        after = scrape(ports["web01"])
        for name, labels, moved in (
                ("malai_requests_total", {"kind": "exec", "decision": "allowed"}, 1),
                ("malai_requests_total", {"kind": "exec", "decision": "denied"}, 1),
                ("malai_exec_exits_total", {"code": "0"}, 1)):
            self.assertEqual(value(after, name, cluster="company", **labels) - value(before, name, cluster="company",
                                                                                        **labels), moved, name)
        self.assertGreaterEqual(value(after, "malai_links", cluster="company"), 1)  # to the manager, maybe web02
        # on the manager: its machines and how long ago each was heard from
        cm = scrape(ports["cm"])
        self.assertEqual(value(cm, "malai_machines", cluster="company", state="online"), 2)
        self.assertEqual(value(cm, "malai_machines", cluster="company", state="offline"), 1)  # laptop, never seen
        self.assertLess(value(cm, "malai_heartbeat_age_seconds", cluster="company", machine="web01"), 3)
        self.assertGreaterEqual(value(cm, "malai_config_version", cluster="company"), 2)
        # a config change pushed after the metrics came up: the pushes and their acks are timed
        with open(c.config, "a") as f:
            f.write('\n[machine.web01.command.up]\ncommand = "uptime"\nallow_from = "web02"\n')  # web01 and web02
        c.cm.ok("rescan")
        wait_for(lambda: value(scrape(ports["cm"]), "malai_config_push_seconds_count", cluster="company",
                               outcome="acked") == 2, 30, "two acked pushes")
        cm = scrape(ports["cm"])
        self.assertLess(value(cm, "malai_config_push_seconds_sum", cluster="company", outcome="acked"), 10)
        # only /metrics is served, and nothing once [metrics] is gone
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{ports['cm']}/", timeout=10)
        self.assertEqual(e.exception.code, 404)
        (c.cm.root / "malai.toml").write_text("")
        self.assertIn("metrics: removed", c.cm.ok("rescan"))
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports["cm"]), timeout=5).close()


class AuditCountingTests(SynchronousTestCase):
    """Audit records of each kind, as the daemon writes them, counted (no daemon: an idle stand-in)."""

    def setUp(self):
        idle = SimpleNamespace(summary=lambda: [])
        root = SimpleNamespace(started_at=0.0, pool=SimpleNamespace(links=list), reactor=SimpleNamespace(seconds=float),
                               clusters={}, relayer=SimpleNamespace(summary=lambda: {"active": 0, "total": 3,
                                                                                     "bytes": 9}),
                               forwards=idle)
        self.metrics = Metrics(root)
        self.audit = AuditLog(Path(tempfile.mkdtemp()) / "audit.jsonl", self.metrics.audit)

    def sample(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)

    def test_each_kind(self):
        self.audit.record(cluster="c", caller="x", http="admin", decision="allowed", status=502, duration=0.02)
        self.audit.record(cluster="c", caller="x", tcp="db", decision="allowed", bytes_in=10, bytes_out=20)
        self.audit.record(cluster="c", caller="x", tcp="db", decision="failed", rule="upstream down")
        self.audit.record(cluster="c", caller="x", argv=["ls"], decision="invalid", rule="bad")
        self.audit.record(cluster="c", caller="x", argv=["ls"], decision="allowed", exit=2, bytes_in=1, bytes_out=5)
        self.assertEqual(self.sample("malai_http_responses_total", cluster="c", status="502"), 1)
        self.assertEqual(self.sample("malai_http_request_duration_seconds_bucket", cluster="c", le="0.025"), 1)
        self.assertEqual(self.sample("malai_http_request_duration_seconds_bucket", cluster="c", le="0.01"), 0)
        self.assertEqual(self.sample("malai_stream_bytes_total", cluster="c", kind="tcp", direction="out"), 20)
        self.assertEqual(self.sample("malai_stream_bytes_total", cluster="c", kind="exec", direction="out"), 5)
        self.assertEqual(self.sample("malai_denials_total", cluster="c", kind="tcp", reason="failed"), 1)
        self.assertEqual(self.sample("malai_denials_total", cluster="c", kind="exec", reason="invalid"), 1)
        self.assertEqual(self.sample("malai_exec_exits_total", cluster="c", code="2"), 1)
        self.assertEqual(self.sample("malai_relay_streams_total"), 3)
        names = {f.name for f in text_string_to_metric_families(self.metrics.text().decode())}
        self.assertTrue(all(n.startswith("malai_") for n in names), names)

    def test_metrics_listen_is_parsed(self):
        self.assertEqual(parse_device('[metrics]\nlisten = "tcp:9464:interface=127.0.0.1"\n').metrics,
                         "tcp:9464:interface=127.0.0.1")
        self.assertIsNone(parse_device("").metrics)
        with self.assertRaises(ConfigError) as e:
            parse_device("[metrics]\n")
        self.assertIn("metrics.listen", str(e.exception))
