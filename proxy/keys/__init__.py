"""Master-key providers and the key vault: the I/O around data keys.

`providers` wrap and unwrap data key material with a master key held by a KMS
(or, for "local", by the proxy). `master_keys.MasterKeys` holds the providers a
policy configures and picks the one that can unwrap a given key document.
`vault.KeyVault` reads and writes the key-vault collection.
"""
