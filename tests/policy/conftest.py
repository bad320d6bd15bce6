"""Shared inputs for the policy tests: a small valid policy as parsed YAML."""

from __future__ import annotations

import pytest


@pytest.fixture
def policy_data() -> dict:
    """A fresh, valid policy mapping that a test may modify freely."""
    return {
        "keys": {"master_key_file": "master.key"},
        "classes": ["identity", "clinical"],
        "collections": {
            "clinic.patients": {
                "fields": {
                    "ssn": {"class": "identity", "algorithm": "deterministic"},
                    "name": {"class": "identity"},
                    "contact.phone": {"class": "identity"},
                    "conditions": {"class": "clinical"},
                },
            },
        },
        "roles": {
            "doctor": {"identity": "clear", "clinical": "clear"},
            "billing": {"identity": "clear", "clinical": "redact"},
            "auditor": {"identity": "mask"},
        },
        "identity": [
            {"mongodb_role": "clinician@clinic", "roles": ["doctor"]},
            {"user": "auditor@admin", "roles": ["auditor"]},
        ],
        "default_role": None,
    }
