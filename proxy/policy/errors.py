"""The one exception of the policy layer: the policy file is wrong."""

from __future__ import annotations

from pathlib import Path


class PolicyError(Exception):
    """The policy file is missing, not valid YAML, or breaks a rule of the policy format.

    The message reads "FILE: WHERE: PROBLEM", where WHERE is the dotted key path of the
    offending entry (for example `collections.clinic.patients.fields.ssn.algorithm`) or,
    for a YAML syntax error, the line and column. WHERE is left out when the whole file
    is at fault (it cannot be read, or it is empty). PROBLEM states what is wrong and
    what is allowed instead.
    """

    def __init__(self, source: Path | str, where: str | None, problem: str) -> None:
        self.source = Path(source)
        self.where = where
        self.problem = problem

        if where is None:
            message = f"{source}: {problem}"
        else:
            message = f"{source}: {where}: {problem}"
        super().__init__(message)
