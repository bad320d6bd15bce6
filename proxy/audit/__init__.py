"""Audit records: who did what to protected data and to its keys.

Records are JSON objects, one per line, hash-chained and sealed with a MAC
(`chain`), appended to the policy's `audit.file` (`file_sink`) and inserted
into its `audit.collection` by the proxy's background writer (`trail`). A
record never holds a protected value, a key or a data subject's identifier: a
subject appears only as the token of its key's alt name.
"""
