"""Audit records: who did what to protected data and to its keys.

Records are JSON objects, one per line, appended to the file the policy's
`audit.file` names. A record never holds a protected value, a key or a data
subject's identifier: a subject appears only as the token of its key's alt name.
"""
