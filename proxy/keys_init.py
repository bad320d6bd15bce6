"""`mongoveil keys init`: the master-key file and one data key per class."""

from __future__ import annotations

from pathlib import Path

from proxy.crypto.master_key import create_local_master_key_file
from proxy.policy import load_policy
from proxy.server.app import open_key_vault


async def init_keys(policy_path: Path, upstream_uri: str) -> list[str]:
    """Create what is missing and return one line per action for the operator."""
    policy = load_policy(policy_path)
    lines = []
    if create_local_master_key_file(policy.master_key_file):
        lines.append(f"created master key file {policy.master_key_file} (mode 0600); back it up: "
                     "without it no protected value can be decrypted")
    else:
        lines.append(f"using existing master key file {policy.master_key_file}")

    client, vault = open_key_vault(policy, upstream_uri)
    try:
        await vault.ensure_indexes()
        for class_name in policy.classes:
            key = await vault.load_class_key(class_name, create=True)
            lines.append(f"class {class_name}: data key {key.id}")
    finally:
        await client.close()
    return lines
