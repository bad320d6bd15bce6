"""Bulk decryption: mongoveil's cipher against pymongocrypt (libmongocrypt) in the same run.

The workload is the bulk-decryption benchmark of MongoDB's client-side
encryption specification, as pymongocrypt's test/performance/perf_test.py
runs it. One document has 1,500 fields "key0000" to "key1499", each the string
"value NNNN" encrypted with AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic under
one data key that a "local" master key wraps. Each run decrypts the whole
document again and again for one second. A figure is the median of the runs'
documents per second, with the minimum and maximum, and fields per second is
that times the field count.

pymongo's ClientEncryption creates the data key in a SecantusDB key vault
and encrypts the values, so both sides decrypt libmongocrypt's ciphertexts.
The paths measured:

* pymongocrypt, per value: `ClientEncryption.decrypt` on each field.
* pymongocrypt, whole document: the auto-decryption path of a MongoClient
  with `AutoEncryptionOpts(bypass_auto_encryption=True)`, which takes the
  BSON reply and returns the decrypted BSON.
* mongoveil, per value: `KeyRing.decrypt` on each field of the decoded document.
* mongoveil, whole document: the reply path, BSON bytes in and BSON bytes
  out: decode, `reveal_reply` with the clear view, encode.

The process pins itself to one CPU before it measures, so libmongocrypt and
the Python code each get one core. SecantusDB is only asked for the key once.

Run: .venv/bin/python bench/micro_bulk_decrypt.py [--runs 10] [--seconds 1] [--fields 1500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bson
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import MongoClient
from pymongo.encryption import Algorithm as DriverAlgorithm
from pymongo.encryption import ClientEncryption
from pymongo.encryption_options import AutoEncryptionOpts

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.crypto.key_document import data_key_from_document  # noqa: E402
from proxy.crypto.keyring import KeyRing  # noqa: E402
from proxy.crypto.master_key import LocalMasterKey  # noqa: E402
from proxy.demo.secantus import free_port  # noqa: E402
from proxy.policy import View, parse_policy  # noqa: E402
from proxy.rewrite import RewriteContext, reveal_reply  # noqa: E402
from proxy.wire.bson_options import CODEC_OPTIONS  # noqa: E402

KEY_VAULT_NAMESPACE = "encryption.__keyVault"
CLASS_NAME = "bench"
DRIVER_CODEC_OPTIONS = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


def _start_key_vault() -> tuple[subprocess.Popen, str]:
    """Start an in-memory SecantusDB for the key vault, and return the process and its URI."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("secantusd-py")), "--host", "127.0.0.1",
         "--port", str(port), "--storage-path", ":memory:"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    deadline = time.monotonic() + 30
    while True:
        try:
            with MongoClient(uri, serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
            return server, uri
        except Exception:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("SecantusDB did not start within 30 s") from None
            time.sleep(0.2)


def _documents_per_second(decrypt_once: Callable[[], object], seconds: float) -> float:
    started = time.perf_counter()
    count = 0
    while True:
        decrypt_once()
        count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return count / elapsed


def _measure(decrypt_once: Callable[[], object], runs: int, seconds: float) -> list[float]:
    _documents_per_second(decrypt_once, min(seconds, 1.0))     # warm-up, discarded
    return [_documents_per_second(decrypt_once, seconds) for _ in range(runs)]


def _pin_to_one_cpu() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        return "not pinned (no sched_setaffinity)"
    return f"pinned to CPU {cpu}"


def _reveal_context(data_key) -> RewriteContext:
    policy = parse_policy({
        "keys": {"master_key_file": "master.key"},
        "classes": [CLASS_NAME],
        "collections": {"bench.fields": {"fields": {"key0000": {"class": CLASS_NAME}}}},
        "roles": {"reader": {CLASS_NAME: "clear"}},
    }, Path("/nonexistent/policy.yaml"))
    ring = KeyRing()
    ring.add(data_key)
    return RewriteContext(policy, ring, {CLASS_NAME: View.CLEAR})


def run(runs: int, seconds: float, fields: int) -> list[tuple[str, list[float]]]:
    """Measure every path, and return (path, documents per second of each run) pairs."""
    master_key = os.urandom(96)
    kms_providers = {"local": {"key": master_key}}
    server, uri = _start_key_vault()
    try:
        key_vault_client = MongoClient(uri)
        client_encryption = ClientEncryption(kms_providers, KEY_VAULT_NAMESPACE,
                                             key_vault_client, DRIVER_CODEC_OPTIONS)
        key_id = client_encryption.create_data_key(
            "local", key_alt_names=[f"mongoveil:{CLASS_NAME}"])
        document = {
            f"key{index:04}": client_encryption.encrypt(
                f"value {index:04}", DriverAlgorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Deterministic,
                key_id=key_id)
            for index in range(fields)
        }
        encoded = bson.encode(document)
        expected = {name: f"value {name[3:]}" for name in document}

        auto_client = MongoClient(uri, connect=False, auto_encryption_opts=AutoEncryptionOpts(
            kms_providers, KEY_VAULT_NAMESPACE, key_vault_client=key_vault_client,
            bypass_auto_encryption=True))
        auto_decrypter = auto_client._encrypter      # the object that decrypts every reply

        key_document = key_vault_client.encryption["__keyVault"].find_one({"_id": key_id})
        data_key = data_key_from_document(key_document, LocalMasterKey(master_key))
        context = _reveal_context(data_key)

        def driver_per_value() -> dict:
            return {name: client_encryption.decrypt(value) for name, value in document.items()}

        def driver_document() -> bytes:
            return auto_decrypter.decrypt(encoded)

        def mongoveil_per_value() -> dict:
            ring = context.keys
            return {name: ring.decrypt(value)[1] for name, value in document.items()}

        def mongoveil_document() -> bytes:
            body = bson.decode(encoded, codec_options=CODEC_OPTIONS)
            return bson.encode(reveal_reply(body, context), codec_options=CODEC_OPTIONS)

        paths = {
            "pymongocrypt, ClientEncryption.decrypt per value": driver_per_value,
            "pymongocrypt, auto-decryption of the document": driver_document,
            "mongoveil, KeyRing.decrypt per value": mongoveil_per_value,
            "mongoveil, reply path (decode, reveal_reply, encode)": mongoveil_document,
        }
        # Every path must return the plaintexts before it is timed.
        assert driver_per_value() == expected
        assert bson.decode(driver_document()) == expected
        assert mongoveil_per_value() == expected
        assert bson.decode(mongoveil_document()) == expected

        print(f"{fields} deterministic string fields per document, {runs} runs of "
              f"{seconds:g} s, process {_pin_to_one_cpu()}", flush=True)
        results = []
        for name, decrypt_once in paths.items():
            per_run = _measure(decrypt_once, runs, seconds)
            results.append((name, per_run))
            print(_row(name, per_run, fields), flush=True)

        auto_client.close()
        client_encryption.close()
        key_vault_client.close()
        return results
    finally:
        server.terminate()
        server.wait(timeout=10)


def _row(name: str, per_run: list[float], fields: int) -> str:
    median = statistics.median(per_run)
    return (f"{name:55s} {median:9.1f} documents/s ({min(per_run):.1f}-{max(per_run):.1f}), "
            f"{median * fields:11.0f} fields/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per path (default 10)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="length of one run in seconds (default 1)")
    parser.add_argument("--fields", type=int, default=1500,
                        help="encrypted fields in the document (default 1500)")
    options = parser.parse_args(argv)

    results = dict(run(options.runs, options.seconds, options.fields))
    driver_best = max(statistics.median(results["pymongocrypt, ClientEncryption.decrypt per value"]),
                      statistics.median(results["pymongocrypt, auto-decryption of the document"]))
    for name in ("mongoveil, KeyRing.decrypt per value",
                 "mongoveil, reply path (decode, reveal_reply, encode)"):
        ratio = statistics.median(results[name]) / driver_best
        print(f"{name}: {ratio:.2f} x the faster pymongocrypt path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
