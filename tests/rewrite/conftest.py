"""Shared fixtures of the rewrite tests: a test policy, a key ring with real keys, contexts."""

from __future__ import annotations

import copy
import os
import uuid
from pathlib import Path

import pytest

from proxy.crypto.cipher import Algorithm
from proxy.crypto.data_key import DataKey, class_alt_name
from proxy.crypto.keyring import KeyRing
from proxy.policy import Policy, View, parse_policy
from proxy.rewrite.aggregate import rewrite_aggregate_pipeline, rewrite_pipeline
from proxy.rewrite.context import RewriteContext, Scope
from proxy.rewrite.errors import CommandError
from proxy.rewrite.pipeline_context import PipelineContext
from proxy.rewrite.tracking import Tracking

NAMESPACE = "clinic.patients"
CLASSES = ("identity", "clinical", "billing")

# A collection that protects ssn like clinic.patients, but mrn and notes with other classes.
CLAIMS_NAMESPACE = "clinic.claims"
# A collection with exactly the fields of clinic.patients.
ARCHIVE_NAMESPACE = "clinic.archive"

PATIENT_FIELDS = {
    "ssn": {"class": "identity", "algorithm": "deterministic"},
    "mrn": {"class": "identity", "algorithm": "deterministic"},
    "contact.phone": {"class": "identity", "algorithm": "deterministic"},
    "insurance.member.id": {"class": "billing", "algorithm": "deterministic"},
    "address": {"class": "identity"},
    "notes": {"class": "clinical"},
    "allergies": {"class": "clinical"},
}

POLICY_DATA = {
    "keys": {"master_key_file": "master.key"},
    "classes": list(CLASSES),
    "views": {"mask": {"keep_last": 4}},
    "collections": {
        NAMESPACE: {"fields": PATIENT_FIELDS},
        CLAIMS_NAMESPACE: {
            "fields": {
                "ssn": {"class": "identity", "algorithm": "deterministic"},
                "mrn": {"class": "billing", "algorithm": "deterministic"},
                "notes": {"class": "billing"},
            }
        },
        ARCHIVE_NAMESPACE: {"fields": PATIENT_FIELDS},
    },
    "roles": {
        "doctor": {"identity": "clear", "clinical": "clear", "billing": "clear"},
        "auditor": {"identity": "mask", "clinical": "ciphertext", "billing": "pseudonym"},
    },
}

ALL_CLEAR = {name: View.CLEAR for name in CLASSES}


def build_policy() -> Policy:
    """Return the test policy, parsed by the real policy loader."""
    return parse_policy(POLICY_DATA, Path("/nonexistent/policy.yaml"))


def build_ring(classes: tuple[str, ...] = CLASSES) -> KeyRing:
    """Return a key ring with one fresh random data key per class."""
    ring = KeyRing()
    for class_name in classes:
        ring.add(new_key(class_name))
    return ring


def new_key(class_name: str | None) -> DataKey:
    """Return a fresh data key of `class_name` (no class alt name when None)."""
    alt_names = (class_alt_name(class_name),) if class_name is not None else ()
    return DataKey(uuid.uuid4(), os.urandom(96), alt_names)


def deterministic(ring: KeyRing, value: object, class_name: str = "identity") -> object:
    """Return the deterministic ciphertext of `value` under the ring's key of `class_name`."""
    return ring.encrypt(value, class_name, Algorithm.DETERMINISTIC)


def plaintext(ring: KeyRing, value: object) -> object:
    """Return the plaintext of the ciphertext `value`."""
    return ring.decrypt(value)[1]


@pytest.fixture
def policy() -> Policy:
    return build_policy()


@pytest.fixture
def ring() -> KeyRing:
    return build_ring()


@pytest.fixture
def ctx(policy: Policy, ring: KeyRing) -> RewriteContext:
    return RewriteContext(policy, ring, dict(ALL_CLEAR))


@pytest.fixture
def scope(policy: Policy, ring: KeyRing) -> Scope:
    collection = policy.collection(NAMESPACE)
    assert collection is not None
    return Scope(NAMESPACE, collection, ring, policy)


def rewritten_pipeline(pipeline: list, scope: Scope) -> list:
    """Return a rewritten copy of `pipeline`, run as an aggregate on the scope's namespace."""
    stages = copy.deepcopy(pipeline)
    rewrite_aggregate_pipeline(stages, scope)
    return stages


def rejection(pipeline: list, scope: Scope) -> str:
    """Return the message with which the rewrite of `pipeline` is rejected as BadValue."""
    with pytest.raises(CommandError) as caught:
        rewrite_aggregate_pipeline(copy.deepcopy(pipeline), scope)
    assert caught.value.code == 2
    return caught.value.message


@pytest.fixture
def pipeline_context(policy: Policy, ring: KeyRing) -> PipelineContext:
    return PipelineContext(NAMESPACE, "clinic", policy, ring, rewrite_pipeline)


@pytest.fixture
def patients() -> Tracking:
    """The tracking of the documents of clinic.patients as stored."""
    return Tracking.of_collection(build_policy().collection(NAMESPACE))
