"""Bulk decryption, as MongoDB's client-side encryption benchmarks specify it.

The specification ("In-Use Encryption: Benchmarks", section "Benchmarking
Bulk Decryption", in MongoDB's specifications repository) uses one data key
wrapped by a "local" master key. The strings "value 0001" to "value 1500",
encrypted with AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic, are the fields
"key0001" to "key1500" of one document. After a one-second warm-up, that
document is decrypted again and again for one second, ten times, and the
median of the decryptions per second is reported. This module runs it on one
thread, pinned to one CPU, for these decryptors:

* pymongocrypt, whole document: a libmongocrypt handle (`mongocrypt_t`)
  decrypting the BSON document, the path pymongo's automatic decryption
  takes; the key vault is answered from memory, as the specification prefers.
* pymongocrypt, per value: the explicit decryption that
  `ClientEncryption.decrypt` calls, once per field.
* mongoveil, whole document: the proxy's reply path, BSON bytes in and out:
  decode, `reveal_reply` with the clear view, encode.
* mongoveil, per value: `KeyRing.decrypt` on each field's ciphertext.

libmongocrypt encrypts the values, so mongoveil decrypts libmongocrypt's
ciphertexts. The first decryption of each path is checked against the
plaintext before anything is timed.

Run: python -m bench.bulk_decrypt [--fields 1500] [--runs 10] [--seconds 1]
prints JSON; --loop NAME --seconds S only repeats one decryptor, for a profiler.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import bson
from pymongocrypt.binding import lib
from pymongocrypt.options import MongoCryptOptions
from pymongocrypt.synchronous.auto_encrypter import AutoEncrypter
from pymongocrypt.synchronous.explicit_encrypter import ExplicitEncrypter
from pymongocrypt.synchronous.state_machine import MongoCryptCallback

from proxy.crypto.data_key import DataKey, class_alt_name
from proxy.crypto.key_document import new_key_document
from proxy.crypto.keyring import KeyRing
from proxy.crypto.master_key import LocalMasterKey
from proxy.policy import View, parse_policy
from proxy.rewrite import RewriteContext, reveal_reply
from proxy.wire.bson_options import CODEC_OPTIONS

DETERMINISTIC = "AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic"
CLASS_NAME = "bulk"
PYMONGOCRYPT_DOCUMENT = "pymongocrypt, whole document"
PYMONGOCRYPT_VALUE = "pymongocrypt, per value"
MONGOVEIL_DOCUMENT = "mongoveil, whole document (decode, reveal_reply, encode)"
MONGOVEIL_VALUE = "mongoveil, per value (KeyRing.decrypt)"
DECRYPTORS = (PYMONGOCRYPT_DOCUMENT, PYMONGOCRYPT_VALUE, MONGOVEIL_DOCUMENT, MONGOVEIL_VALUE)


class _KeyVaultInMemory(MongoCryptCallback):
    """A libmongocrypt callback that returns one key document for every key-vault lookup.

    It performs no other I/O, so any other request raises RuntimeError.
    """

    def __init__(self, key_document: dict) -> None:
        self._key_bytes = bson.encode(key_document, codec_options=CODEC_OPTIONS)

    def fetch_keys(self, filter):
        yield self._key_bytes

    def bson_encode(self, doc):
        return bson.encode(doc, codec_options=CODEC_OPTIONS)

    def kms_request(self, kms_context):
        raise RuntimeError("the local master key needs no KMS request")

    def collection_info(self, database, filter):
        raise RuntimeError("bulk decryption needs no collection information")

    def mark_command(self, database, cmd):
        raise RuntimeError("bulk decryption marks no command")

    def insert_data_key(self, data_key):
        raise RuntimeError("bulk decryption creates no data key")

    def close(self):
        pass


class BulkDocument:
    """The benchmark document, its plaintext, and a decryptor of each kind ready to run."""

    def __init__(self, fields: int) -> None:
        master_key = LocalMasterKey(os.urandom(96))
        data_key = DataKey(uuid.uuid4(), os.urandom(96), (class_alt_name(CLASS_NAME),))
        key_document = new_key_document(master_key.wrap(data_key.material), data_key.alt_names,
                                         master_key.master_key_document(), key_id=data_key.id)
        callback = _KeyVaultInMemory(key_document)
        options = MongoCryptOptions({"local": {"key": master_key.material}}, bypass_encryption=True)
        self._explicit = ExplicitEncrypter(callback, options)
        self._automatic = AutoEncrypter(callback, options)

        self.plaintext = {f"key{number:04d}": f"value {number:04d}"
                          for number in range(1, fields + 1)}
        encrypted = {name: self._encrypt(value, data_key.id)
                     for name, value in self.plaintext.items()}
        self.encoded = bson.encode(encrypted, codec_options=CODEC_OPTIONS)
        self._values = list(encrypted.values())

        self._ring = KeyRing()
        self._ring.add(data_key)
        policy = parse_policy({"keys": {"master_key_file": "unused.key"}, "classes": [CLASS_NAME],
                               "roles": {"reader": {CLASS_NAME: "clear"}}},
                              Path("bulk-decrypt-policy.yaml"))
        self._context = RewriteContext(policy, self._ring, {CLASS_NAME: View.CLEAR})

    def _encrypt(self, value: str, key_id: uuid.UUID):
        encoded = self._explicit.encrypt(bson.encode({"v": value}), DETERMINISTIC,
                                         key_id=key_id.bytes)
        return bson.decode(encoded, codec_options=CODEC_OPTIONS)["v"]

    def decryptor(self, name: str) -> Callable[[], object]:
        """Return a function that decrypts the whole document once, in the named way."""
        encoded, values = self.encoded, self._values
        if name == PYMONGOCRYPT_DOCUMENT:
            decrypt_document = self._automatic.decrypt
            return lambda: decrypt_document(encoded)
        if name == PYMONGOCRYPT_VALUE:
            explicit = self._explicit

            def per_value() -> list:
                return [bson.decode(explicit.decrypt(bson.encode({"v": value})))["v"]
                        for value in values]
            return per_value
        if name == MONGOVEIL_DOCUMENT:
            context = self._context

            def whole_document() -> bytes:
                body = bson.decode(encoded, codec_options=CODEC_OPTIONS)
                return bson.encode(reveal_reply(body, context), codec_options=CODEC_OPTIONS)
            return whole_document
        if name == MONGOVEIL_VALUE:
            decrypt_value = self._ring.decrypt
            return lambda: [decrypt_value(value)[1] for value in values]
        raise ValueError(f"unknown decryptor {name!r}; expected one of {', '.join(DECRYPTORS)}")

    def check(self, name: str) -> None:
        """Raise AssertionError unless the named decryptor returns the plaintext."""
        result = self.decryptor(name)()
        if isinstance(result, bytes):
            result = bson.decode(result, codec_options=CODEC_OPTIONS)
        if isinstance(result, list):
            result = dict(zip(self.plaintext, result))
        assert result == self.plaintext, f"{name} did not return the plaintext"


def documents_per_second(decrypt: Callable[[], object], seconds: float) -> float:
    """Decrypt the document again and again for `seconds`; return decryptions per second."""
    count = 0
    began = time.perf_counter()
    deadline = began + seconds
    while True:
        decrypt()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - began)


def pin_to_one_cpu() -> int:
    """Restrict this process to the first CPU it may use; return that CPU's number."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def run(fields: int, runs: int, seconds: float, warm_up: float) -> dict:
    """Measure every decryptor; return the figures as a JSON-ready mapping."""
    cpu = pin_to_one_cpu()
    document = BulkDocument(fields)
    results: dict[str, list[float]] = {}
    for name in DECRYPTORS:
        document.check(name)
        decrypt = document.decryptor(name)
        documents_per_second(decrypt, warm_up)
        results[name] = [documents_per_second(decrypt, seconds) for _ in range(runs)]
    return {"fields": fields, "runs": runs, "seconds": seconds, "cpu": cpu,
            "native_crypto": bool(lib.mongocrypt_is_crypto_available()), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fields", type=int, default=1500, help="encrypted fields in the document")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each decryptor")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each run, seconds")
    parser.add_argument("--warm-up", type=float, default=1.0, help="untimed first run, seconds")
    parser.add_argument("--loop", choices=DECRYPTORS, default=None,
                        help="only repeat this decryptor for --seconds, for a profiler")
    args = parser.parse_args(argv)

    if args.loop is not None:
        pin_to_one_cpu()
        document = BulkDocument(args.fields)
        document.check(args.loop)
        documents_per_second(document.decryptor(args.loop), args.seconds)
        return 0

    json.dump(run(args.fields, args.runs, args.seconds, args.warm_up), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
