"""Identities: ID52 encoding and parsing, key files."""

import os
import stat

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from malai.identity import ID52Error, Identity, KeyFileError, decode_id52, encode_id52, parse_id52, verify

VECTOR_SECRET = "100d7e23f222267ba0be43855a262461b8a7718572edf58c56db912156d2bc25"
VECTOR_ID52 = "i66fo538lfl5ombdf6tcdbrabp4hmp9asv7nrffuc2im13ct4q60"


class ID52Tests(SynchronousTestCase):
    def test_known_vector(self):
        self.assertEqual(Identity.from_hex(VECTOR_SECRET).id52, VECTOR_ID52)

    @given(st.binary(min_size=32, max_size=32))
    def test_round_trip(self, key):
        id52 = encode_id52(key)
        self.assertEqual(len(id52), 52)
        self.assertEqual(id52, id52.lower())
        self.assertIn(id52[-1], "0g")
        self.assertEqual(decode_id52(id52), key)
        self.assertEqual(decode_id52(id52.upper()), key)

    def test_upper_case_accepted(self):
        self.assertEqual(parse_id52(VECTOR_ID52.upper()), VECTOR_ID52)

    def test_wrong_length(self):
        e = self.assertRaises(ID52Error, parse_id52, VECTOR_ID52[:-1])
        self.assertIn("51 characters", str(e))

    def test_wrong_alphabet(self):
        e = self.assertRaises(ID52Error, parse_id52, "w" + VECTOR_ID52[1:])
        self.assertIn("'w' not in the base32hex alphabet", str(e))

    def test_nonzero_trailing_bits(self):
        e = self.assertRaises(ID52Error, parse_id52, VECTOR_ID52[:-1] + "1")
        self.assertIn("trailing bits", str(e))

    @given(st.text(max_size=60))
    def test_parse_raises_only_id52_error(self, text):
        try:
            self.assertEqual(encode_id52(decode_id52(text)), parse_id52(text))
        except ID52Error:
            pass

    def test_signatures(self):
        ident = Identity.generate()
        sig = ident.sign(b"message")
        self.assertTrue(verify(ident.id52, b"message", sig))
        self.assertFalse(verify(ident.id52, b"other", sig))
        self.assertFalse(verify(Identity.generate().id52, b"message", sig))


class KeyFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "key")

    def test_save_load(self):
        ident = Identity.generate()
        ident.save(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as f:
            text = f.read()
        self.assertEqual(text, ident.secret_hex + "\n")
        self.assertEqual(Identity.load(self.path).id52, ident.id52)
        self.assertEqual(os.listdir(self.dir), ["key"])  # no temp file left

    def test_refuses_overwrite(self):
        Identity.generate().save(self.path)
        e = self.assertRaises(KeyFileError, Identity.generate().save, self.path)
        self.assertIn("already exists", str(e))

    def test_refuses_readable_by_others(self):
        Identity.generate().save(self.path)
        for mode in (0o640, 0o604, 0o644):
            os.chmod(self.path, mode)
            e = self.assertRaises(KeyFileError, Identity.load, self.path)
            self.assertIn(f"chmod 600 {self.path}", str(e))
            self.assertIn(f"{mode:04o}", str(e))

    def test_malformed(self):
        for text in ["abc\n", "zz" * 32 + "\n", "00" * 32 + "\n" + "00" * 32 + "\n"]:
            with open(self.path, "w") as f:
                f.write(text)
            os.chmod(self.path, 0o600)
            e = self.assertRaises(KeyFileError, Identity.load, self.path)
            self.assertIn(self.path, str(e))

    def test_missing(self):
        e = self.assertRaises(KeyFileError, Identity.load, self.path)
        self.assertIn("no key file", str(e))
