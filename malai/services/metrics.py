"""Prometheus metrics at ``/metrics`` where ``[metrics] listen`` in ``malai.toml`` says; off without it.

What peers asked of this device is counted from the audit records (every exec, TCP and HTTP
request ends in one, allowed or not); the rest (links, config versions, machines and their
heartbeat ages on a manager, relays, forwards) is read from the daemon when scraped.
"""

import time
from typing import List, Optional

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

import malai
from malai.services.heartbeats import online
from malai.services.listening import ListeningService
from malai.services.report import Report, change

__all__ = ["Metrics", "apply_metrics"]

#: HTTP request durations (seconds) the histogram tells apart.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PUSH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
KINDS = ("exec", "tcp", "http")


class Metrics:
    """The daemon's registry: counters fed by ``audit``, gauges read from ``root`` at each scrape."""

    def __init__(self, root):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=False)  # _State is read at scrapes only
        r = self.registry
        self.requests = Counter("malai_requests", "Requests peers made of this device, by kind and decision",
                                ["cluster", "kind", "decision"], registry=r)
        self.denials = Counter("malai_denials", "Requests refused, by kind and reason (denied: the ACL; invalid: "
                               "a malformed request; failed: could not be carried out)", ["cluster", "kind", "reason"],
                               registry=r)
        self.exits = Counter("malai_exec_exits", "Commands run here that ended, by exit status",
                             ["cluster", "code"], registry=r)
        self.bytes = Counter("malai_stream_bytes", "Bytes through exec sessions and TCP streams served here "
                             "(in: from the caller)", ["cluster", "kind", "direction"], registry=r)
        self.http = Counter("malai_http_responses", "HTTP requests served to peers, by status",
                            ["cluster", "status"], registry=r)
        self.http_seconds = Histogram("malai_http_request_duration_seconds", "Time to serve an HTTP request to a peer",
                                      ["cluster"], buckets=HTTP_BUCKETS, registry=r)
        self.push_seconds = Histogram("malai_config_push_seconds", "From sending a machine its config to its ack "
                                      "(acked) or to the failure (failed)", ["cluster", "outcome"],
                                      buckets=PUSH_BUCKETS, registry=r)
        r.register(_State(root))

    def pushed(self, cluster: str, acked: bool, seconds: float) -> None:
        """A manager's config push was answered (``acked``) or failed after ``seconds``."""
        self.push_seconds.labels(cluster, "acked" if acked else "failed").observe(seconds)

    def audit(self, fields: dict) -> None:
        """Count one audit record (see malai.audit)."""
        kind = next((k for k in KINDS if k in fields), "exec" if "argv" in fields else None)
        if kind is None:
            return
        cluster, decision = fields.get("cluster", ""), fields.get("decision", "")
        self.requests.labels(cluster, kind, decision).inc()
        if decision != "allowed":
            self.denials.labels(cluster, kind, decision).inc()
            return
        for direction in ("in", "out"):
            if f"bytes_{direction}" in fields:
                self.bytes.labels(cluster, kind, direction).inc(fields[f"bytes_{direction}"])
        if kind == "exec" and fields.get("exit") is not None:
            self.exits.labels(cluster, str(fields["exit"])).inc()
        if kind == "http" and "status" in fields:
            self.http.labels(cluster, str(fields["status"])).inc()
            self.http_seconds.labels(cluster).observe(fields.get("duration", 0.0))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _State:
    """Gauges and counters kept elsewhere in the daemon, read when scraped."""

    def __init__(self, root):
        self.root = root

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        root = self.root
        info = GaugeMetricFamily("malai_info", "This daemon's malai version", labels=["version"])
        info.add_metric([malai.__version__], 1)
        uptime = GaugeMetricFamily("malai_uptime_seconds", "Seconds since the daemon started")
        uptime.add_metric([], time.time() - root.started_at)
        links = GaugeMetricFamily("malai_links", "Open peer links of a cluster's identity", labels=["cluster"])
        version = GaugeMetricFamily("malai_config_version", "The config version a cluster runs (manager: the "
                                    "latest it published)", labels=["cluster"])
        machines = GaugeMetricFamily("malai_machines", "A manager's machines by state", labels=["cluster", "state"])
        ages = GaugeMetricFamily("malai_heartbeat_age_seconds", "Seconds since a manager last heard from a machine",
                                 labels=["cluster", "machine"])
        per_local = {}
        for link in root.pool.links():
            per_local[link.peer.local] = per_local.get(link.peer.local, 0) + 1
        now = root.reactor.seconds()
        for name, svc in root.clusters.items():
            links.add_metric([name], per_local.get(svc.identity.id52, 0))
            version.add_metric([name], svc.config_version())
            if svc.health is None or svc.entry.cluster is None:
                continue
            interval, counts = svc.heartbeat_interval(), {"online": 0, "offline": 0}
            for m in svc.entry.cluster.machines.values():
                seen = svc.health.last_seen(m.id52)
                counts["online" if online(seen, interval, now) else "offline"] += 1
                if seen:
                    ages.add_metric([name, m.name], max(0.0, now - seen))
            for state, count in counts.items():
                machines.add_metric([name, state], count)
        relay = root.relayer.summary()
        relay_active = GaugeMetricFamily("malai_relay_streams_active", "Streams this daemon relays now")
        relay_active.add_metric([], relay["active"])
        relay_total = CounterMetricFamily("malai_relay_streams", "Streams this daemon relayed since it started")
        relay_total.add_metric([], relay["total"])
        relay_bytes = CounterMetricFamily("malai_relay_bytes", "Bytes this daemon relayed since it started")
        relay_bytes.add_metric([], relay["bytes"])
        forwards = GaugeMetricFamily("malai_forward_connections_active", "Open connections of a local TCP forward",
                                     labels=["forward"])
        forwarded = CounterMetricFamily("malai_forward_connections", "Connections a local TCP forward took",
                                        labels=["forward"])
        for f in root.forwards.summary():
            forwards.add_metric([f["name"]], f["active"])
            forwarded.add_metric([f["name"]], f["total"])
        return [info, uptime, links, version, machines, ages, relay_active, relay_total, relay_bytes, forwards,
                forwarded]


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST

        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: metrics are at /metrics\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.text()


class _QuietSite(Site):
    """No access log line per scrape."""

    noisy = False

    def log(self, request) -> None:
        pass


log = Logger()


def apply_metrics(root, listen: Optional[str], check: bool) -> List[Report]:
    """Serve ``/metrics`` on ``listen`` (or stop serving it); counters survive a change of endpoint."""
    current = root.metrics_listener.description if root.metrics_listener is not None else None
    action = change(current, listen)
    if action is None:
        return []
    if check:
        return [Report("metrics", action)]
    if root.metrics_listener is not None:
        root.metrics_listener.disownServiceParent()
        root.metrics_listener = None
    if listen is None:
        root.metrics = None
        return [Report("metrics", action)]
    if root.metrics is None:
        root.metrics = Metrics(root)
    site = _QuietSite(_MetricsPage(root.metrics))
    root.metrics_listener = ListeningService(root.reactor, listen, site)
    root.metrics_listener.setServiceParent(root)
    root.metrics_listener.ready.addErrback(
        lambda f: log.error("metrics: cannot listen on {listen}: {why}", listen=listen, why=f.getErrorMessage()))
    return [Report("metrics", action)]
