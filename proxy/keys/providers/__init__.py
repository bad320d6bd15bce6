"""One module per master-key provider, each a `MasterKeyProvider` (see `base`).

The modules of remote providers import their vendor's client library, so
`registry.open_provider` imports a module only when a policy names its provider.
"""
