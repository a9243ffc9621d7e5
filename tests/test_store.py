"""The manager's config store and signed envelopes."""

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from malai.config.envelope import Envelope
from malai.config.errors import ConfigError
from malai.config.store import ClusterStore, HashMismatch, sha256_hex
from malai.errors import MalaiError
from tests.helpers import KEYS, cluster_text


class StoreTests(SynchronousTestCase):
    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        (self.folder / "cluster.toml").write_text(cluster_text())
        KEYS["cm"].save(self.folder / "cluster.private-key")  # versions are checked against it, as on rescan
        self.store = ClusterStore(self.folder)

    def test_versions_and_history(self):
        first = self.store.current()
        self.assertEqual(first.version, 1)
        self.assertEqual(self.store.current(), first)  # unchanged: same version
        (self.folder / "cluster.toml").write_text(cluster_text("# hand edit\n"))
        second = self.store.current()
        self.assertEqual(second.version, 2)
        self.assertEqual([h["version"] for h in self.store.history()], [1, 2])
        self.assertEqual(self.store.revision(1).text, cluster_text())
        e = self.assertRaises(MalaiError, self.store.revision, 9)
        self.assertIn("versions: 1, 2", str(e))

    def test_upload_compare_and_swap(self):
        base = self.store.current().sha256
        new = cluster_text("[group.x]\nmembers = \"*\"\n")
        rev = self.store.upload(new, base)
        self.assertEqual((rev.version, rev.sha256), (2, sha256_hex(new)))
        e = self.assertRaises(HashMismatch, self.store.upload, cluster_text(), base)
        self.assertEqual(e.current, sha256_hex(new))
        self.assertIn("download it again", str(e))
        self.assertEqual(self.store.upload(cluster_text(), base, force=True).version, 3)

    def test_invalid_upload_changes_nothing(self):
        base = self.store.current().sha256
        self.assertRaises(ConfigError, self.store.upload, "garbage = [", base)
        self.assertEqual((self.folder / "cluster.toml").read_text(), cluster_text())
        self.assertEqual(self.store.current().version, 1)

    def test_state_and_history_survive_a_lost_state_file(self):
        self.store.current()
        (self.folder / "cluster.toml").write_text(cluster_text("# 2\n"))
        self.store.current()
        (self.folder / "state.json").unlink()
        (self.folder / "cluster.toml").write_text(cluster_text("# 3\n"))
        self.assertEqual(self.store.current().version, 3)  # never reuses a version number


class EnvelopeTests(SynchronousTestCase):
    def setUp(self):
        self.cm, self.web = KEYS["cm"], KEYS["web01"].id52
        self.env = Envelope.seal(self.cm, self.web, 7, "version = 7\n")

    def test_sound(self):
        self.assertIsNone(self.env.problem(self.cm.id52, self.web))

    def test_problems(self):
        import attrs

        other = KEYS["mallory"]
        cases = {
            "names manager": attrs.evolve(self.env, cluster=other.id52),
            "is for machine": attrs.evolve(self.env, machine=KEYS["db01"].id52),
            "does not match": attrs.evolve(self.env, body="version = 8\n"),
            "signature does not verify": attrs.evolve(self.env, signature=other.sign(self.env.signed_bytes())),
        }
        for expected, env in cases.items():
            self.assertIn(expected, env.problem(self.cm.id52, self.web))
        # the version is signed: changing it breaks the signature
        self.assertIn("signature", attrs.evolve(self.env, version=8).problem(self.cm.id52, self.web))
