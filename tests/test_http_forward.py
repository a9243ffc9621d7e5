"""HTTP forwarding end to end: real daemons, curl, a WebSocket client and an HTTP/1.1 upstream."""

import hashlib
import http.client
import json
import os
import socket
import subprocess
import tempfile

from twisted.trial.unittest import TestCase

from tests.helpers import LoopbackCluster, add_http_fronts, free_port, start_http_upstream, wait_for
from tests.test_tcp_forward import _usage


class HttpForwardTests(TestCase):
    """web01 exposes admin (and test services); laptop's HTTP front reaches them; intruder may not."""

    cluster = None

    def setUp(self):
        if HttpForwardTests.cluster is None:
            HttpForwardTests._build()

    @classmethod
    def _build(cls):
        port, ws_port = start_http_upstream()

        def config(ids, ports):
            return (f'\n[machine.web01]\nid52 = "{ids["web01"]}"\naddrs = ["127.0.0.1:{ports["web01"]}"]\n'
                    f'\n[machine.web01.http.admin]\nport = {port}\nallow_from = "laptop"\n'
                    f'\n[machine.web01.http.ws]\nport = {ws_port}\nallow_from = "laptop"\n'
                    f'\n[machine.web01.http.quick]\nport = {port}\nallow_from = "laptop"\ntimeout = 1\n'
                    f'\n[machine.web01.http.down]\nport = {free_port()}\nallow_from = "laptop"\n'
                    f'\n[machine.web01.http.plain]\nport = {port}\nallow_from = "laptop, intruder"\n'
                    'inject_headers = false\n'
                    f'\n[machine.laptop]\nid52 = "{ids["laptop"]}"\n'
                    f'\n[machine.intruder]\nid52 = "{ids["intruder"]}"\n')

        cls.cluster = LoopbackCluster(("web01", "laptop", "intruder"), config)
        cls.homes = cls.cluster.homes
        cls.front = add_http_fronts(cls.cluster, ("laptop", "intruder"))

    def curl(self, url_path: str, *args: str, who: str = "laptop", service: str = "admin.company"):
        """(status, body) of curl against ``http://<service>.localhost:<front>/<url_path>``."""
        url = f"http://{service}.localhost:{self.front[who]}{url_path}"
        r = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args, url], capture_output=True,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        body, _, status = r.stdout.rpartition(b"\n")
        return int(status), body

    def test_answer_carries_the_verified_caller(self):
        status, body = self.curl("/headers")
        self.assertEqual(status, 200)
        headers = json.loads(body)
        names = [n for n, _ in headers]
        got = dict(headers)
        self.assertEqual(got["malai-client-id52"], self.cluster.ids["laptop"])
        self.assertEqual((got["malai-client-machine"], got["malai-client-cluster"]), ("laptop", "company"))
        self.assertEqual(got["x-forwarded-host"], f"admin.company.localhost:{self.front['laptop']}")
        self.assertEqual((got["x-forwarded-proto"], got["x-forwarded-for"]), ("http", "127.0.0.1"))
        self.assertEqual(names.count("malai-client-id52"), 1)

    def test_forged_identity_never_reaches_the_upstream(self):
        forged = "0" * 52
        status, body = self.curl("/headers", "-H", f"malai-client-id52: {forged}", "-H", "Malai-Client-Machine: web01",
                                 "-H", "X-Repeated: a", "-H", "X-Repeated: b")
        headers = json.loads(body)
        self.assertNotIn(forged, [v for _, v in headers])
        self.assertEqual([v for n, v in headers if n == "malai-client-id52"], [self.cluster.ids["laptop"]])
        self.assertEqual([v for n, v in headers if n == "malai-client-machine"], ["laptop"])
        self.assertEqual([v for n, v in headers if n == "x-repeated"], ["a", "b"])  # repeated headers kept
        # a service with inject_headers = false still drops what the caller claims
        status, body = self.curl("/headers", "-H", f"malai-client-id52: {forged}", service="plain.company")
        self.assertEqual([n for n, _ in json.loads(body) if n.startswith("malai-")], [])

    def test_100_mb_up_and_down_with_bounded_memory(self):
        daemons = {name: self.homes[name].pid() for name in ("laptop", "web01")}
        before = {name: _usage(pid)[1] for name, pid in daemons.items()}
        data = os.urandom(100 * 1000 * 1000)
        with tempfile.NamedTemporaryFile(dir="/tmp") as f:
            f.write(data)
            f.flush()
            status, body = self.curl("/digest", "--data-binary", f"@{f.name}", "-H", "Content-Type: application/octet-stream")
            self.assertEqual(body.decode(), f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")
            status, body = self.curl("/digest", "-T", f.name, "-H", "Transfer-Encoding: chunked")  # chunked upload
            self.assertEqual((status, body.decode()), (200, f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"))
        r = subprocess.run(f"curl -sS http://admin.company.localhost:{self.front['laptop']}/bytes/100000000 | sha256sum",
                           shell=True, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.stdout.split()[0], hashlib.sha256(b"z" * 100000000).hexdigest())
        for name, pid in daemons.items():
            grown = _usage(pid)[1] - before[name]
            self.assertLess(grown, 40 * 1024 * 1024, f"{name} grew by {grown} bytes moving 100 MB")

    def test_chunked_response(self):
        r = subprocess.run(["curl", "-sS", "-i", f"http://admin.company.localhost:{self.front['laptop']}/chunked"],
                           capture_output=True, timeout=60)
        head, _, body = r.stdout.partition(b"\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", head.lower())
        self.assertEqual(body, b"first,second,third")

    def test_websocket_echo(self):
        from websockets.sync.client import connect

        sock = socket.create_connection(("127.0.0.1", self.front["laptop"]))
        with connect(f"ws://ws.company.localhost:{self.front['laptop']}/", sock=sock) as ws:
            for message in ("hello", "x" * 100000, b"\x00\x01binary"):
                ws.send(message)
                self.assertEqual(ws.recv(timeout=20), message)

    def test_1000_keep_alive_requests_on_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.front["laptop"], timeout=30)
        host = f"admin.company.localhost:{self.front['laptop']}"
        socks = set()
        for _ in range(1000):
            conn.request("GET", "/bytes/100", headers={"Host": host})
            response = conn.getresponse()
            self.assertEqual((response.status, len(response.read())), (200, 100))
            socks.add(id(conn.sock))
        conn.close()
        self.assertEqual(len(socks), 1)

    def test_misdirected_request_on_a_routed_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.front["laptop"], timeout=30)
        conn.request("GET", "/bytes/1", headers={"Host": f"admin.company.localhost:{self.front['laptop']}"})
        self.assertEqual(conn.getresponse().read(), b"z")
        conn.request("GET", "/bytes/1", headers={"Host": f"ws.company.localhost:{self.front['laptop']}"})
        response = conn.getresponse()
        self.assertEqual(response.status, 421)
        response.read()
        conn.close()

    def test_error_pages(self):
        status, body = self.curl("/", service="nothing.company")
        self.assertEqual(status, 404)
        self.assertIn(f"http://admin.company.localhost:{self.front['laptop']}/".encode(), body)
        status, body = self.curl("/", who="intruder", service="admin.web01.company")
        self.assertEqual(status, 403)
        self.assertIn(b"web01.company does not let this device use http service admin", body)
        status, body = self.curl("/", service="down.company")
        self.assertEqual(status, 502)
        self.assertIn(b"not answering", body)
        status, body = self.curl("/slow", service="quick.company")
        self.assertEqual(status, 504)
        self.assertIn(b"did not answer within 1 s", body)
        status, body = self.curl("/headers", who="intruder", service="plain.company")
        self.assertEqual(status, 200)  # intruder may reach plain
        audit = [json.loads(line) for line in (self.homes["web01"].root / "log" / "audit.jsonl").read_text().splitlines()]
        self.assertTrue(any(a.get("http") == "admin" and a["decision"] == "denied" for a in audit))
        self.assertTrue(any(a.get("http") == "admin" and a.get("status") == 200 for a in audit))

    def test_service_commands_and_open(self):
        home = self.homes["laptop"]
        r = home.malai("open", "admin.company", "--print-only")
        self.assertEqual(r.stdout.strip(), f"http://admin.company.localhost:{self.front['laptop']}/")
        r = home.malai("open", "nothing.company", "--print-only")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no machine of company offers", r.stderr)
        listed = json.loads(home.ok("service", "list", "--json"))
        [front] = [row for row in listed if row["kind"] == "http"]
        self.assertIn(f"http://admin.company.localhost:{self.front['laptop']}/", front["urls"])
        home.ok("service", "remove", "http")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.front["laptop"])).close()
        home.ok("service", "add", "http", f"127.0.0.1:{self.front['laptop']}")
        wait_for(lambda: self.curl("/bytes/1")[0] == 200, what="the front back")
