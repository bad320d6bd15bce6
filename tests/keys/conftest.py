"""Fixtures of the key-management tests: a test CA for the KMS stand-ins.

Under --import-mode=importlib pytest puts no test folder on sys.path, so this
conftest adds its own; the stand-in modules here (`tls_ca`, `standin_*`) are
then importable by their plain names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_KEYS_FOLDER = str(Path(__file__).resolve().parent)
if _KEYS_FOLDER not in sys.path:
    sys.path.append(_KEYS_FOLDER)

from tls_ca import TlsFiles, make_tls_files  # noqa: E402


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a certificate for 127.0.0.1, shared by every stand-in of the run."""
    return make_tls_files(tmp_path_factory.mktemp("kms-tls"))
