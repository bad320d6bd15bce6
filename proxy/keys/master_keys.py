"""The master keys of a policy, opened as providers, and the choice among them.

New data keys are wrapped by the active master key. An existing key document is
unwrapped by whichever configured master key its `masterKey` names, so data keys
wrapped under an older master key stay usable during and after a rewrap.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from proxy.crypto.errors import MasterKeyError
from proxy.policy import Policy
from proxy.policy.model import MasterKeyConfig

from .providers.base import MasterKeyProvider

# provider name -> (module, class, the pip extra that installs its client library)
PROVIDER_CLASSES: dict[str, tuple[str, str, str | None]] = {
    "local": ("proxy.keys.providers.local", "LocalProvider", None),
    "aws": ("proxy.keys.providers.aws", "AwsProvider", "aws"),
    "gcp": ("proxy.keys.providers.gcp", "GcpProvider", "gcp"),
    "azure": ("proxy.keys.providers.azure", "AzureProvider", "azure"),
    "vault": ("proxy.keys.providers.vault", "VaultProvider", "vault"),
}


def open_provider(config: MasterKeyConfig) -> MasterKeyProvider:
    """Build the provider of one configured master key.

    Raises MasterKeyError when the provider's client library is not installed
    or its settings cannot be used (a missing key file, for example).
    """
    module_name, class_name, extra = PROVIDER_CLASSES[config.provider]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MasterKeyError(
            f"master key {config.name!r}: the {config.provider} provider needs a library that "
            f"is not installed ({exc.name}); install it with: pip install 'mongoveil[{extra}]'"
        ) from None
    provider_class: type[MasterKeyProvider] = getattr(module, class_name)
    return provider_class(config.name, config.settings)


class MasterKeys:
    """The configured master keys; `active` wraps new data keys."""

    def __init__(self, providers: Iterable[MasterKeyProvider], active: str) -> None:
        self.providers = {provider.name: provider for provider in providers}
        if active not in self.providers:
            raise LookupError(f"master key {active!r} is not configured")
        self.active = self.providers[active]

    @classmethod
    def from_policy(cls, policy: Policy) -> MasterKeys:
        """Open every master key of the policy. Raises MasterKeyError like `open_provider`."""
        return cls((open_provider(config) for config in policy.master_keys), policy.master_key)

    def named(self, name: str) -> MasterKeyProvider:
        """Return the master key called `name`. Raises LookupError naming the choices."""
        try:
            return self.providers[name]
        except KeyError:
            raise LookupError(
                f"no master key named {name!r}; the policy configures: "
                f"{', '.join(self.providers)}"
            ) from None

    def for_document(self, master_key_doc: object) -> MasterKeyProvider | None:
        """Return the first configured master key that a key document's `masterKey` names, or None."""
        candidates = self.candidates(master_key_doc)
        return candidates[0] if candidates else None

    def candidates(self, master_key_doc: object) -> list[MasterKeyProvider]:
        """Return every configured master key that a key document's `masterKey` may name.

        Several "local" keys all write {provider: "local"}, so a document wrapped by
        one of them names them all; the caller tries each. The active key comes first
        because most documents are wrapped by it.
        """
        if not isinstance(master_key_doc, Mapping):
            return []
        provider = master_key_doc.get("provider")
        ordered = [self.active, *(p for p in self.providers.values() if p is not self.active)]
        return [candidate for candidate in ordered
                if candidate.kind == provider and candidate.identifies(master_key_doc)]
