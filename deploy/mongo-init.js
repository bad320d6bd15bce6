// The roles and users of the example policy (policies/healthcare.yaml), the
// same as proxy/demo/users.py creates for the demo.
//
// The mongo image's entrypoint runs this file with mongosh, logged in as the
// root user, and only on the first start with an empty data folder. The clinic
// users have demo passwords: replace them before any real use. The proxy's own
// account takes its password from MONGOVEIL_SERVICE_PASSWORD, the variable that
// docker-compose.yml also uses to build the proxy's upstream URI.

const servicePassword = process.env.MONGOVEIL_SERVICE_PASSWORD;
if (!servicePassword) {
  throw new Error("MONGOVEIL_SERVICE_PASSWORD is not set: set it in the mongod container's environment");
}

// Custom roles in the clinic database, each inheriting a built-in role. The
// policy's identity section maps them to policy roles.
const clinicRoles = {
  clinician: "readWrite",
  billing: "readWrite",
  researcher: "read",
  clerk: "readWrite",
  nurse: "readWrite",
};

// [user, authentication database, password, roles as [role, database]]
const users = [
  ["drhouse", "clinic", "demo-clinician", [["clinician", "clinic"]]],
  ["billy", "clinic", "demo-billing", [["billing", "clinic"]]],
  ["rita", "clinic", "demo-researcher", [["researcher", "clinic"]]],
  ["auditor", "admin", "demo-auditor", [["read", "clinic"]]],
  ["cleo", "clinic", "demo-clerk", [["clerk", "clinic"]]],
  ["nina", "clinic", "demo-nurse", [["nurse", "clinic"]]],
  ["nobody", "clinic", "demo-nobody", [["read", "clinic"]]],
  // The proxy's own account: it reads and writes the key vault and nothing else.
  ["mongoveil", "admin", servicePassword, [["readWrite", "encryption"]]],
];

const clinic = db.getSiblingDB("clinic");
for (const [role, inherited] of Object.entries(clinicRoles)) {
  clinic.createRole({role: role, privileges: [], roles: [{role: inherited, db: "clinic"}]});
}

for (const [name, database, password, roles] of users) {
  db.getSiblingDB(database).createUser({
    user: name,
    pwd: password,
    roles: roles.map(([role, roleDatabase]) => ({role: role, db: roleDatabase})),
  });
}
