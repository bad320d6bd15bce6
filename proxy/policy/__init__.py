"""The policy layer: which fields are protected, their data classes, and the view each role gets.

Load a policy with `load_policy(path)`; every error is a PolicyError naming the file and
the key path. The model classes are plain immutable data and perform no I/O.
"""

from .errors import PolicyError
from .loader import DEFAULT_KEY_VAULT, DEFAULT_MASK_KEEP_LAST, load_policy, parse_policy
from .model import (
    REVEAL_ORDER,
    CollectionPolicy,
    FieldRule,
    IdentityRule,
    KeyCacheSettings,
    Policy,
    View,
    most_revealing,
)
from .summary import check_policy, summarize_policy

__all__ = [
    "DEFAULT_KEY_VAULT",
    "DEFAULT_MASK_KEEP_LAST",
    "REVEAL_ORDER",
    "CollectionPolicy",
    "FieldRule",
    "IdentityRule",
    "KeyCacheSettings",
    "Policy",
    "PolicyError",
    "View",
    "check_policy",
    "load_policy",
    "most_revealing",
    "parse_policy",
    "summarize_policy",
]
