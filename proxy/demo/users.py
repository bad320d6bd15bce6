"""The MongoDB roles and users of the example healthcare deployment.

The MongoDB roles here are the ones `policies/healthcare.yaml` maps to policy
roles, so each demo user sees the patients through a different view. The
passwords are fixed because the demo server lives only on 127.0.0.1 for the
length of the demo and the connection strings are printed for `mongosh`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymongo import MongoClient


@dataclass(frozen=True)
class DemoUser:
    name: str
    database: str
    password: str
    roles: tuple[tuple[str, str], ...]   # (role, db)
    description: str

    def uri(self, address: str) -> str:
        """Return a connection string that logs in as this user at `address`."""
        return (
            f"mongodb://{self.name}:{self.password}@{address}/clinic"
            f"?authSource={self.database}&directConnection=true"
        )


# Custom roles in the `clinic` database, each inheriting a built-in role.
CLINIC_ROLES = {
    "clinician": "readWrite",
    "billing": "readWrite",
    "researcher": "read",
    "clerk": "readWrite",
    "nurse": "readWrite",
}

CLINICIAN = DemoUser("drhouse", "clinic", "demo-clinician", (("clinician", "clinic"),),
                     "clinician@clinic -> policy role doctor")
BILLING = DemoUser("billy", "clinic", "demo-billing", (("billing", "clinic"),),
                   "billing@clinic -> policy role billing")
RESEARCHER = DemoUser("rita", "clinic", "demo-researcher", (("researcher", "clinic"),),
                      "researcher@clinic -> policy role researcher")
AUDITOR = DemoUser("auditor", "admin", "demo-auditor", (("read", "clinic"),),
                   "user auditor@admin -> policy role auditor")
CLERK = DemoUser("cleo", "clinic", "demo-clerk", (("clerk", "clinic"),),
                 "clerk@clinic -> policy role clerk: only the patients she registered")
NURSE = DemoUser("nina", "clinic", "demo-nurse", (("nurse", "clinic"),),
                 "nurse@clinic -> policy role nurse: clinical data denied, break-glass allowed")
NOBODY = DemoUser("nobody", "clinic", "demo-nobody", (("read", "clinic"),),
                  "mapped to no policy role: protected values withheld")
# The proxy's own account: it reads and writes the key vault, nothing else.
SERVICE = DemoUser("mongoveil", "admin", "demo-service", (("readWrite", "encryption"),),
                   "the proxy's key-vault account")

DEMO_USERS = (CLINICIAN, BILLING, RESEARCHER, AUDITOR, CLERK, NURSE, NOBODY, SERVICE)


def provision_users(client: MongoClient, users: tuple[DemoUser, ...] = DEMO_USERS) -> None:
    """Create the clinic roles and the demo users on a server running without --auth."""
    clinic = client["clinic"]
    for role, inherited in CLINIC_ROLES.items():
        clinic.command(
            "createRole", role,
            privileges=[],
            roles=[{"role": inherited, "db": "clinic"}],
        )

    for user in users:
        client[user.database].command(
            "createUser", user.name,
            pwd=user.password,
            roles=[{"role": role, "db": db} for role, db in user.roles],
        )
