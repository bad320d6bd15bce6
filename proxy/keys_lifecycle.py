"""`mongoveil keys rotate | rewrap | shred`: replacing, re-wrapping and destroying data keys.

rotate gives a class a new data key and keeps the old one for the values it
encrypted; `mongoveil migrate` then re-encrypts those values. rewrap puts every
data key under another master key without touching any value. shred deletes
the key of one data subject, which makes every value encrypted with it
unreadable, in the database and in every backup of it.
"""

from __future__ import annotations

import getpass
import socket
from pathlib import Path

from proxy.audit.file_sink import AuditWriteError, append_sealed
from proxy.server.audit_trail import load_audit_mac_key
from proxy.crypto.keyring import KeyRing
from proxy.keys_commands import Confirm, KeysCommandError, open_vault
from proxy.policy import Policy, load_policy


def _check_class(policy: Policy, policy_path: Path, class_name: str) -> None:
    if class_name not in policy.classes:
        raise KeysCommandError(
            f"class {class_name!r} is not in the policy {policy_path}; "
            f"its classes are: {', '.join(policy.classes)}"
        )


async def rotate_key(
    policy_path: Path, upstream_uri: str, class_name: str, *, confirm: Confirm | None = None
) -> list[str]:
    """Retire the current data key of a class and create its successor; return the output lines.

    The retired key keeps decrypting the values it encrypted, until `mongoveil migrate`
    has re-encrypted them under the new key. Running proxies switch to the new key
    when their cached class key expires (keys.cache.ttl_seconds). Raises
    KeysCommandError for an unknown class, a class with one key per subject, or a
    declined confirmation.
    """
    policy = load_policy(policy_path)
    _check_class(policy, policy_path, class_name)
    if class_name in policy.key_per:
        # TODO: rotate per-subject keys; each subject's key would need its own successor.
        raise KeysCommandError(
            f"class {class_name!r} has one data key per {policy.key_per[class_name]!r}; "
            "rotating those keys is not supported. To move them to a new master key, use "
            "`mongoveil keys rewrap`"
        )

    question = (f"Rotate the data key of class {class_name}? New values will be encrypted "
                "with a new key; run `mongoveil migrate` afterwards to re-encrypt old ones.")
    if confirm is not None and not confirm(question):
        raise KeysCommandError(f"class {class_name!r} was not rotated: not confirmed")

    async with open_vault(policy, upstream_uri) as vault:
        await vault.ensure_indexes()
        retired = await vault.retire_class_key(class_name)
        key = await vault.load_class_key(class_name, create=True)
    if key is None:
        raise KeysCommandError(f"class {class_name!r}: the new data key could not be created; "
                               "run the command again")

    lines = []
    if retired is not None:
        lines.append(f"class {class_name}: retired data key {retired}; it still decrypts the "
                     "values it encrypted")
    lines.append(f"class {class_name}: new data key {key.id}")
    lines.append(f"re-encrypt the old values with `mongoveil migrate --namespace DB.COLL` for "
                 f"each collection with {class_name} fields; running proxies take the new key "
                 f"within {policy.key_cache.ttl_seconds:g} s (keys.cache.ttl_seconds)")
    return lines


async def rewrap_keys(
    policy_path: Path, upstream_uri: str, target_name: str, *, confirm: Confirm | None = None
) -> list[str]:
    """Wrap every data key anew with the master key `target_name`; return the output lines.

    Every key is unwrapped and wrapped again before any document changes, so an
    unreachable provider or a refused wrap leaves the key vault as it was. Then each
    document is updated on its own, matching its old wrapped material. A run stopped
    half-way leaves keys under the old and the new master key, all readable while
    both are configured; running the command again finishes the job.
    """
    policy = load_policy(policy_path)
    if policy.master_key_named(target_name) is None:
        names = ", ".join(config.name for config in policy.master_keys)
        raise KeysCommandError(
            f"no master key named {target_name!r} in {policy_path}; keys.master_keys has: "
            f"{names}. Add the new master key there first"
        )

    async with open_vault(policy, upstream_uri) as vault:
        target = vault.master_keys.named(target_name)
        pending = await vault.rewrap_documents(target)
        if not pending:
            return [f"every data key is already wrapped by master key {target_name!r}"]

        question = (f"Rewrap {len(pending)} data keys with master key {target_name!r} "
                    f"({target.kind})? The values they encrypt do not change.")
        if confirm is not None and not confirm(question):
            raise KeysCommandError("no data key was rewrapped: not confirmed")

        stored = 0
        for doc, material in pending:
            if await vault.store_rewrapped(doc, material, target):
                stored += 1

    lines = [f"rewrapped {stored} of {len(pending)} data keys with master key {target_name!r}"]
    if stored < len(pending):
        lines.append(f"{len(pending) - stored} keys changed while the command ran; run it again")
    if policy.master_key != target_name:
        lines.append(f"new data keys are still wrapped by {policy.master_key!r}; set "
                     f"keys.master_key: {target_name} in the policy to change that")
    lines.append("keep the old master key configured until every proxy and driver reads "
                 "the rewrapped keys")
    return lines


async def shred_subject(
    policy_path: Path,
    upstream_uri: str,
    class_name: str,
    subject: object,
    *,
    reason: str | None = None,
    audit: bool = True,
    confirm: Confirm | None = None,
) -> list[str]:
    """Delete the data key of one data subject of a class; return the output lines.

    The subject is given as its value in the documents (a string, or any BSON value
    from --subject-json). Its key is found by the alt name that the proxy derives
    from the class key, and deleted after confirmation. The shred is appended to
    the policy's audit file before the key is deleted, so no shred goes unrecorded,
    and a "key.shred.failed" record follows when the deletion then fails. Records
    are sealed into the file's hash chain with the audit key of the key vault
    (created on first use), and never hold the subject's value. With no audit
    file the command refuses unless `audit` is False. Raises KeysCommandError.
    """
    policy = load_policy(policy_path)
    _check_class(policy, policy_path, class_name)
    if class_name not in policy.key_per:
        raise KeysCommandError(
            f"class {class_name!r} has one data key for all its values, so it cannot be "
            "shredded for one subject; configure it as "
            f"`classes: {{{class_name}: {{key_per: FIELD}}}}` for values written from now on"
        )
    if audit and policy.audit_file is None:
        raise KeysCommandError(
            "the policy has no audit file (audit.file), and a shred must be recorded; "
            "configure one, or pass --no-audit to record it elsewhere yourself"
        )

    async with open_vault(policy, upstream_uri) as vault:
        class_key = await vault.load_class_key(class_name, create=False)
        if class_key is None:
            raise KeysCommandError(f"class {class_name!r} has no data key in the key vault, "
                                   "so no subject of it has a key")
        ring = KeyRing()
        ring.add(class_key)
        alt_name = ring.subject_alt_name(class_name, subject)
        token = alt_name.rsplit(":", 1)[1]

        info = next((info for info in await vault.list_keys() if alt_name in info.alt_names),
                    None)
        if info is None:
            raise KeysCommandError(
                f"no data key of class {class_name!r} for this subject (token {token}): "
                "nothing was written for it, or it is shredded already"
            )

        question = (f"Shred data key {info.id} (class {class_name}, subject token {token})? "
                    "Every value encrypted with it becomes unreadable for good, in backups "
                    "too. This cannot be undone.")
        if confirm is not None and not confirm(question):
            raise KeysCommandError(f"data key {info.id} was not shredded: not confirmed")

        mac_key = None
        if audit:
            mac_key = await load_audit_mac_key(vault, create=True)
            if mac_key is None:
                raise KeysCommandError(
                    f"the audit key (alt name mongoveil:audit) in {policy.key_vault} is "
                    "disabled, so no audit record can be sealed; nothing was shredded")
            record = {"class": class_name, "key_id": str(info.id), "subject_token": token,
                      "operator": _operator(), "key_vault": policy.key_vault}
            if reason:
                record["reason"] = reason
            try:
                append_sealed(policy.audit_file, mac_key, "key.shred", record)
            except AuditWriteError as error:
                raise KeysCommandError(f"{error}; nothing was shredded") from None

        try:
            deleted = await vault.delete_named_key(alt_name)
        except Exception:
            if mac_key is not None:
                # The record above logs the shred request, and this one logs its failure.
                append_sealed(policy.audit_file, mac_key, "key.shred.failed",
                              {"class": class_name, "key_id": str(info.id)})
            raise

    if deleted is None:
        return [f"data key {info.id} was deleted by someone else in the meantime"]
    lines = [f"shredded data key {deleted} of class {class_name} (subject token {token})"]
    if audit:
        lines.append(f"recorded in {policy.audit_file}")
    lines.append(f"running proxies forget the key within {policy.key_cache.ttl_seconds:g} s "
                 "(keys.cache.ttl_seconds); restart them to make it immediate")
    return lines


def _operator() -> str:
    """Who runs the command, as "user@host", for the audit record."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
