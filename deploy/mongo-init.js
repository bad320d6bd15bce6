// Runs once when the mongod container starts with an empty data folder:
// the roles and users of the example policy, with demo passwords.
const clinic = db.getSiblingDB("clinic");
clinic.createRole({role: "clinician", privileges: [], roles: [{role: "readWrite", db: "clinic"}]});
clinic.createRole({role: "billing", privileges: [], roles: [{role: "readWrite", db: "clinic"}]});
clinic.createRole({role: "researcher", privileges: [], roles: [{role: "read", db: "clinic"}]});
clinic.createUser({user: "drhouse", pwd: "demo-clinician", roles: ["clinician"]});
clinic.createUser({user: "billy", pwd: "demo-billing", roles: ["billing"]});
clinic.createUser({user: "rita", pwd: "demo-researcher", roles: ["researcher"]});

const admin = db.getSiblingDB("admin");
admin.createUser({user: "auditor", pwd: "demo-auditor", roles: [{role: "read", db: "clinic"}]});
// The proxy's own account: the key vault only.
admin.createUser({user: "mongoveil", pwd: "demo-service", roles: [{role: "readWrite", db: "encryption"}]});
