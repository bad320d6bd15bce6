"""The master-key part of the policy's `keys` section: which providers exist and their settings.

A policy names its master keys under `keys.master_keys`, each with a provider and the
provider's settings, and picks the one that wraps new data keys with `keys.master_key`.
`keys.master_key_file: PATH` is the short form of one "local" master key read from a file.

The settings that go into a key document's `masterKey` are spelled as MongoDB's drivers
spell them (`region`, `key`, `keyVaultEndpoint`, ...), so an operator can copy them from a
driver's configuration. Settings that only the proxy needs are in snake case. Credentials
are never settings: each provider reads them where its vendor's tools do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .model import MasterKeyConfig
from .names import identifier_problem
from .shape import ShapeChecker, child_path, listing


@dataclass(frozen=True)
class ProviderSettings:
    """The settings one provider accepts.

    `required` must all be present; of each group in `one_of`, exactly one must be.
    `paths` are resolved against the policy file's folder.
    """

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()
    paths: tuple[str, ...] = ()

    @property
    def allowed(self) -> tuple[str, ...]:
        grouped = tuple(name for group in self.one_of for name in group)
        return self.required + grouped + self.optional


_TLS = ("tls_ca_file",)

PROVIDER_SETTINGS: dict[str, ProviderSettings] = {
    "local": ProviderSettings(one_of=(("file", "env"),), paths=("file",)),
    "aws": ProviderSettings(
        required=("region", "key"), optional=("endpoint",) + _TLS, paths=_TLS
    ),
    "gcp": ProviderSettings(
        required=("projectId", "location", "keyRing", "keyName"),
        optional=("keyVersion", "endpoint") + _TLS,
        paths=_TLS,
    ),
    "azure": ProviderSettings(
        required=("keyVaultEndpoint", "keyName"), optional=("keyVersion",) + _TLS, paths=_TLS
    ),
    "vault": ProviderSettings(
        required=("keyName",), optional=("mount", "address") + _TLS, paths=_TLS
    ),
}

# The name the short form `master_key_file` gives its master key.
SHORT_FORM_NAME = "local"


class MasterKeysParser(ShapeChecker):
    """Validation of `keys.master_key_file`, `keys.master_keys` and `keys.master_key`."""

    def parse_master_keys(self, keys: dict[str, object]) -> tuple[tuple[MasterKeyConfig, ...], str]:
        """Return the configured master keys and the name of the active one."""
        has_file = "master_key_file" in keys
        has_list = "master_keys" in keys
        if has_file == has_list:
            self.fail(
                "keys",
                "give either master_key_file (one local master key) or master_keys "
                "(named master keys of any provider), not both and not neither",
            )

        if has_file:
            if "master_key" in keys:
                self.fail("keys.master_key", "only used with master_keys; remove it")
            name = self.string(keys["master_key_file"], "keys.master_key_file")
            config = MasterKeyConfig(SHORT_FORM_NAME, "local", {"file": str(self.resolve(name))})
            return (config,), SHORT_FORM_NAME

        entries = self.mapping(keys["master_keys"], "keys.master_keys")
        if not entries:
            self.fail("keys.master_keys", "the mapping is empty; configure at least one master key")
        configs = tuple(
            self.parse_master_key(name, entry) for name, entry in entries.items()
        )

        names = [config.name for config in configs]
        if "master_key" in keys:
            active = self.choice(keys["master_key"], "keys.master_key", names, "master key")
        elif len(configs) == 1:
            active = configs[0].name
        else:
            self.fail(
                "keys.master_key",
                f"missing; with several master keys, name the one that wraps new data keys "
                f"({listing(names)})",
            )
        return configs, active

    def parse_master_key(self, name: str, value: object) -> MasterKeyConfig:
        where = child_path("keys.master_keys", name)
        problem = identifier_problem(name)
        if problem is not None:
            self.fail(where, problem)
        entry = self.mapping(value, where)

        provider = self.choice(
            entry.get("provider"), child_path(where, "provider"), PROVIDER_SETTINGS, "provider"
        )
        spec = PROVIDER_SETTINGS[provider]
        settings = {key: item for key, item in entry.items() if key != "provider"}
        self.check_keys(settings, where, spec.allowed, required=spec.required)

        for group in spec.one_of:
            present = [key for key in group if key in settings]
            if len(present) != 1:
                self.fail(where, f"the {provider} provider takes exactly one of {listing(group)}")

        checked: dict[str, str] = {}
        for key, item in settings.items():
            text = self.string(item, child_path(where, key))
            checked[key] = str(self.resolve(text)) if key in spec.paths else text
        return MasterKeyConfig(name, provider, checked)

    def resolve(self, name: str) -> Path:
        """Return a path of the policy as an absolute path, relative to the policy's folder."""
        return self.source.absolute().parent / Path(name).expanduser()
