"""`mongoveil keys ...`: the life cycle of the master key and the data keys.

Each command returns the lines to print. None of them contains key material:
`list` reads the key vault without the keyMaterial field, and the other
commands print key ids and class names only.
"""

from __future__ import annotations

import datetime
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from pymongo import AsyncMongoClient

from proxy.crypto.data_key import class_alt_name
from proxy.crypto.key_document import KeyInfo
from proxy.crypto.master_key import create_local_master_key_file
from proxy.keys.vault import KeyVault
from proxy.policy import Policy, load_policy
from proxy.server.app import open_key_vault

# Asks the operator a yes/no question and returns the answer.
Confirm = Callable[[str], bool]


class KeysCommandError(Exception):
    """A keys command was rejected. The message states why and what to do instead."""


@asynccontextmanager
async def open_vault(policy: Policy, upstream_uri: str) -> AsyncIterator[KeyVault]:
    """Yield the policy's key vault through a client of its own, closed afterwards."""
    client, vault = open_key_vault(policy, upstream_uri)
    try:
        yield vault
    finally:
        await client.close()


async def init_keys(policy_path: Path, upstream_uri: str) -> list[str]:
    """Create what is missing and return one line per action for the operator."""
    policy = load_policy(policy_path)
    lines = []
    if policy.master_key_file is not None and not policy.master_key_file.exists():
        await _refuse_new_master_key_for_used_vault(policy, upstream_uri)
    if policy.master_key_file is None:
        lines.append(f"master key {policy.master_key!r}: held by its {policy.active_master_key.provider} provider")
    elif create_local_master_key_file(policy.master_key_file):
        lines.append(f"created master key file {policy.master_key_file} (mode 0600); back it up: "
                     "without it no protected value can be decrypted")
    else:
        lines.append(f"using existing master key file {policy.master_key_file}")

    async with open_vault(policy, upstream_uri) as vault:
        await vault.ensure_indexes()
        for class_name in policy.classes:
            key = await vault.load_class_key(class_name, create=True)
            if key is None:
                lines.append(f"class {class_name}: no active data key (its key is disabled)")
            else:
                lines.append(f"class {class_name}: data key {key.id}")
    return lines


async def _refuse_new_master_key_for_used_vault(policy: Policy, upstream_uri: str) -> None:
    """Refuse to create a master key file when the key vault already has local data keys.

    A new master key could unwrap none of them, so the missing file is far more
    likely a wrong path or a lost key to restore than a first start.
    """
    database, collection = policy.key_vault.split(".", 1)
    client: AsyncMongoClient = AsyncMongoClient(upstream_uri, serverSelectionTimeoutMS=5000)
    try:
        count = await client[database][collection].count_documents(
            {"masterKey.provider": "local"}, limit=1)
    finally:
        await client.close()
    if count:
        raise KeysCommandError(
            f"master key file {policy.master_key_file} does not exist, but the key vault "
            f"{policy.key_vault} already holds data keys wrapped by a local master key; a new "
            "master key could not unwrap them. Check the path in keys.master_key_file, or "
            "restore the file from your backup")


async def list_keys(policy_path: Path, upstream_uri: str, *, as_json: bool) -> list[str]:
    """Return one line per key document of the policy's key vault, oldest first.

    With ``as_json`` each line is a JSON object and an empty vault gives no
    lines. Otherwise the lines are aligned columns under a header.
    """
    policy = load_policy(policy_path)
    async with open_vault(policy, upstream_uri) as vault:
        infos = await vault.list_keys()

    rows = [_key_row(info) for info in infos]
    if as_json:
        return [json.dumps(row) for row in rows]
    if not rows:
        return [f"no data keys in key vault {policy.key_vault}"]
    return _format_table(rows)


def _key_row(info: KeyInfo) -> dict[str, object]:
    created = None
    if info.created is not None:
        utc = info.created.astimezone(datetime.timezone.utc)
        created = utc.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"
    return {
        "id": str(info.id),
        "alt_names": list(info.alt_names),
        "class": info.class_name,
        "provider": info.provider,
        "created": created,
        "status": _status(info),
    }


def _status(info: KeyInfo) -> str:
    if info.disabled:
        return "disabled"
    if info.kind == "retired":
        return "retired"
    return "active"


def _format_table(rows: list[dict[str, object]]) -> list[str]:
    header = ["ID", "ALT NAMES", "CLASS", "PROVIDER", "CREATED", "STATUS"]
    table = [header]
    for row in rows:
        alt_names = ",".join(row["alt_names"]) or "-"   # type: ignore[arg-type]
        cells = [row["id"], alt_names, row["class"], row["provider"], row["created"],
                 row["status"]]
        table.append(["-" if cell is None else str(cell) for cell in cells])

    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in table]


async def create_key(policy_path: Path, upstream_uri: str, class_name: str) -> list[str]:
    """Create the data key of a class that has no active key and return the output lines.

    Raises KeysCommandError when the policy does not name the class, when the
    class already has an active key, or when a disabled key still has the
    class's alt name.
    """
    policy = load_policy(policy_path)
    if class_name not in policy.classes:
        raise KeysCommandError(
            f"class {class_name!r} is not in the policy {policy_path}; "
            f"its classes are: {', '.join(policy.classes)}"
        )

    async with open_vault(policy, upstream_uri) as vault:
        await vault.ensure_indexes()
        existing = await vault.load_class_key(class_name, create=False)
        if existing is not None:
            raise KeysCommandError(
                f"class {class_name!r} already has the active data key {existing.id}; "
                f"to replace it, run `mongoveil keys rotate --class {class_name}`"
            )
        key = await vault.load_class_key(class_name, create=True)

    if key is None:
        raise KeysCommandError(
            f"class {class_name!r} has only a disabled data key, which keeps the alt name "
            f"{class_alt_name(class_name)!r}; give the class a new key with "
            f"`mongoveil keys rotate --class {class_name}`"
        )
    return [f"class {class_name}: created data key {key.id}"]


async def disable_key(
    policy_path: Path,
    upstream_uri: str,
    *,
    key_id: uuid.UUID | None = None,
    class_name: str | None = None,
    confirm: Confirm | None = None,
) -> list[str]:
    """Mark one data key disabled, chosen by id or by class, and return the output lines.

    Exactly one of ``key_id`` and ``class_name`` is given. ``confirm`` is asked
    before the change, and None means the operator confirmed already (--yes).
    Raises KeysCommandError when no key matches, when a class has several
    active keys, or when the operator declines.
    """
    policy = load_policy(policy_path)
    if class_name is not None and class_name not in policy.classes:
        raise KeysCommandError(
            f"class {class_name!r} is not in the policy {policy_path}; "
            f"its classes are: {', '.join(policy.classes)}"
        )
    async with open_vault(policy, upstream_uri) as vault:
        info = _choose_key(await vault.list_keys(), key_id, class_name)
        if info.disabled:
            return [f"data key {info.id} is disabled already"]

        question = (f"Disable data key {info.id} (class {info.class_name or '-'})? "
                    "The proxy will encrypt no new values with it.")
        if confirm is not None and not confirm(question):
            raise KeysCommandError(f"data key {info.id} was not disabled: not confirmed")

        changed = await vault.disable_key(info.id)

    if not changed:
        return [f"data key {info.id} is disabled already"]
    return [f"disabled data key {info.id} (class {info.class_name or '-'}); values "
            "encrypted with it stay readable; a running proxy that has loaded it keeps "
            f"using it until its cached copy expires ({policy.key_cache.ttl_seconds:g} s, "
            "keys.cache.ttl_seconds)"]


def _choose_key(
    infos: list[KeyInfo], key_id: uuid.UUID | None, class_name: str | None
) -> KeyInfo:
    if key_id is not None:
        for info in infos:
            if info.id == key_id:
                return info
        raise KeysCommandError(f"data key {key_id} not found in the key vault")

    alt_name = class_alt_name(class_name)
    holders = [info for info in infos if alt_name in info.alt_names]
    if not holders or holders[0].disabled:
        raise KeysCommandError(f"class {class_name!r} has no active data key")
    return holders[0]


def terminal_confirm(question: str) -> bool:
    """Ask ``question`` on the terminal and return True only for a reply of y or yes."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    reply = sys.stdin.readline()
    return reply.strip().lower() in {"y", "yes"}
