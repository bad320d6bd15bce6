"""The peer: pymongo with MongoDB's own client-side field level encryption (libmongocrypt).

The peer does in the client what mongoveil does in the proxy, with the same data
keys: it reads the proxy's key vault with the same local master key. Writes are
encrypted field by field with `ClientEncryption.encrypt`. Reads go through a
client with `AutoEncryptionOpts(bypass_auto_encryption=True)`, which decrypts
every reply automatically but sends commands as they are, so an equality query
carries a value that `ClientEncryption.encrypt` encrypted deterministically.
With the "local" KMS provider only, libmongocrypt contacts no KMS.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass

from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo import MongoClient
from pymongo.encryption import Algorithm, ClientEncryption
from pymongo.encryption_options import AutoEncryptionOpts

from proxy.crypto.data_key import class_alt_name
from proxy.policy import CollectionPolicy, load_policy

CODEC_OPTIONS = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


@dataclass(frozen=True)
class FieldEncryption:
    """The data key id and the algorithm with which the peer encrypts one protected field."""

    path: str
    key_id: uuid.UUID
    algorithm: str


class Peer:
    """A pymongo client with client-side encryption, straight to the server."""

    def __init__(self, server_uri: str, policy_path, master_key_path, *, pool_size: int) -> None:
        policy = load_policy(policy_path)
        key_vault_namespace = policy.key_vault
        # The master key file is base64 text, as `mongoveil keys init` writes it.
        master_key = base64.b64decode(b"".join(master_key_path.read_bytes().split()))
        kms_providers = {"local": {"key": master_key}}

        self.key_vault_client = MongoClient(server_uri, uuidRepresentation="standard")
        self.encryption = ClientEncryption(kms_providers, key_vault_namespace,
                                           self.key_vault_client, CODEC_OPTIONS)
        self.client = MongoClient(
            server_uri, maxPoolSize=pool_size, uuidRepresentation="standard",
            auto_encryption_opts=AutoEncryptionOpts(
                kms_providers, key_vault_namespace, key_vault_client=self.key_vault_client,
                bypass_auto_encryption=True))
        self._fields: dict[str, list[FieldEncryption]] = {}
        self._policy = policy

    def fields(self, namespace: str) -> list[FieldEncryption]:
        """Return the protected fields of a collection with the key the proxy would use."""
        if namespace not in self._fields:
            collection: CollectionPolicy = self._policy.collection(namespace)
            self._fields[namespace] = [
                FieldEncryption(rule.path, self._class_key_id(rule.class_name),
                                Algorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Deterministic
                                if rule.deterministic
                                else Algorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Random)
                for rule in collection.fields.values()
            ]
        return self._fields[namespace]

    def _class_key_id(self, class_name: str) -> uuid.UUID:
        document = self.encryption.get_key_by_alt_name(class_alt_name(class_name))
        if document is None:
            raise RuntimeError(f"the key vault has no data key named {class_alt_name(class_name)}; "
                               "run `mongoveil keys init` first")
        return document["_id"]

    def encrypt_document(self, document: dict, namespace: str) -> dict:
        """Return a copy of a top-level document with its protected fields encrypted."""
        encrypted = dict(document)
        for field in self.fields(namespace):
            if field.path in encrypted:
                encrypted[field.path] = self.encryption.encrypt(
                    encrypted[field.path], field.algorithm, key_id=field.key_id)
        return encrypted

    def encrypt_query_value(self, value: object, namespace: str, path: str) -> object:
        """Encrypt a value to compare with a deterministically encrypted field."""
        for field in self.fields(namespace):
            if field.path == path:
                return self.encryption.encrypt(value, field.algorithm, key_id=field.key_id)
        raise KeyError(f"{path} is not a protected field of {namespace}")

    def close(self) -> None:
        self.client.close()
        self.encryption.close()
        self.key_vault_client.close()
