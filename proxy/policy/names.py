"""Checks for the names a policy contains: classes and roles, namespaces, field paths, principals.

Each check returns None for a valid name, or a sentence that states what is wrong and
what is allowed, for the loader to put into a PolicyError.
"""

from __future__ import annotations

import re

# Class names end up in key alt names ("mongoveil:NAME"), role names in audit records and
# logs, so both stay plain identifiers.
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

# Characters MongoDB does not allow in database names on Linux and macOS, plus NUL.
_DB_FORBIDDEN = frozenset('/\\. "$\0')
_DB_MAX_BYTES = 63

# The database of users that authenticate outside MongoDB (x.509, LDAP, Kerberos, OIDC).
EXTERNAL_DB = "$external"


def identifier_problem(name: str) -> str | None:
    """Check a class or role name: a letter, then letters, digits, '_' or '-'."""
    if _IDENTIFIER.fullmatch(name):
        return None
    return f"invalid name {name!r}: use a letter followed by letters, digits, '_' or '-'"


def database_problem(db: str) -> str | None:
    """Check a database name against MongoDB's naming restrictions."""
    if not db:
        return "the database name is empty"

    bad = sorted(set(db) & _DB_FORBIDDEN)
    if bad:
        listed = " ".join(repr(char) for char in bad)
        return f"the database name {db!r} contains {listed}, which MongoDB does not allow"

    if len(db.encode()) > _DB_MAX_BYTES:
        return f"the database name {db!r} is longer than {_DB_MAX_BYTES} bytes"
    return None


def namespace_problem(namespace: str) -> str | None:
    """Check a namespace "db.collection". The collection part may contain further dots."""
    db, dot, collection = namespace.partition(".")
    if not dot or not collection:
        return f"invalid namespace {namespace!r}: use the form 'database.collection'"

    problem = database_problem(db)
    if problem is not None:
        return f"invalid namespace {namespace!r}: {problem}"

    if "$" in collection or "\0" in collection:
        return f"invalid namespace {namespace!r}: a collection name cannot contain '$' or NUL"
    if collection.startswith("system."):
        return f"invalid namespace {namespace!r}: system collections cannot be protected"
    return None


def field_path_problem(path: str) -> str | None:
    """Check a dotted field path of a protected field.

    The path must not start with `_id`, because the server needs the document id in
    clear. It must not contain '$', which MongoDB reserves for operators, nor NUL, nor an
    empty segment.
    """
    if "$" in path:
        return f"invalid field path {path!r}: a field path cannot contain '$'"
    if "\0" in path:
        return f"invalid field path {path!r}: a field path cannot contain NUL"

    segments = path.split(".")
    if "" in segments:
        return f"invalid field path {path!r}: empty segment; separate field names with single dots"
    if segments[0] == "_id":
        return f"invalid field path {path!r}: _id and fields inside it cannot be protected"
    return None


def principal_problem(principal: str) -> str | None:
    """Check a MongoDB user or role in the form "name@db". The name may contain '@'."""
    name, at, db = principal.rpartition("@")
    if not at or not name:
        return f"invalid name {principal!r}: use the form 'name@database', for example 'clinician@clinic'"
    if db == EXTERNAL_DB:
        return None

    problem = database_problem(db)
    if problem is not None:
        return f"invalid name {principal!r}: {problem}"
    return None
