"""End to end: live policy reload, seen from a pymongo connection that stays open across it.

One proxy checks its policy file every 0.2 seconds (`--policy-poll 0.2`);
another checks it only once an hour, so that only SIGHUP reloads it. Both run
the example policy on collections of their own. Each client has a pool of one
connection, so every read goes over the connection that was open before the
reload. The tests replace the policy file by a rename: a watcher that polls
can read a file that is being written in place, and it then logs a refused
reload for the half-written file. After each test the example policy is
written back and reloaded.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import pytest
from bson import Binary
from pymongo.collection import Collection

from access_proxy import CLINICAL_FIELDS, DATABASE, AccessProxy, access_proxy, example_roles, wait_for
from policy_proxy import run_cli
from proxy.demo.users import BILLING, CLINICIAN

COLLECTION = "patients_reload"
NAMESPACE = f"{DATABASE}.{COLLECTION}"
KEY_VAULT = "encryption.__keyVault_reload"
SIGNAL_COLLECTION = "patients_reload_signal"
SIGNAL_KEY_VAULT = "encryption.__keyVault_reload_signal"

POLL_SECONDS = "0.2"
# Long enough that the file watcher never fires during the module.
NO_POLL_SECONDS = "3600"
# How long a test waits to be sure that a reload did not happen.
QUIET_SECONDS = 1.0

RELOADED = "policy reloaded ("
REFUSED = r"policy reload \(.*\) rejected, the old policy stays in force: "


def billing_sees_clinical_roles() -> dict:
    roles = example_roles()
    roles["billing"]["clinical"] = "clear"
    return roles


@pytest.fixture(scope="module")
def proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    folder = tmp_path_factory.mktemp("reload")
    with access_proxy(deployment, folder, NAMESPACE, KEY_VAULT,
                      options=("--policy-poll", POLL_SECONDS)) as running:
        yield running


@pytest.fixture(scope="module")
def signal_proxy(deployment, tmp_path_factory) -> Iterator[AccessProxy]:
    folder = tmp_path_factory.mktemp("reload-signal")
    with access_proxy(deployment, folder, f"{DATABASE}.{SIGNAL_COLLECTION}", SIGNAL_KEY_VAULT,
                      options=("--policy-poll", NO_POLL_SECONDS)) as running:
        yield running


def reload_count(proxy: AccessProxy) -> int:
    return proxy.log().count(RELOADED)


def refusal_lines(proxy: AccessProxy) -> list[str]:
    return [line for line in proxy.log().splitlines() if re.search(REFUSED, line)]


@pytest.fixture(autouse=True)
def example_policy_afterwards(request) -> Iterator[None]:
    """Write the example policy back after the test and wait until the proxy reloaded it."""
    yield
    for name in ("proxy", "signal_proxy"):
        if name not in request.fixturenames:
            continue
        running = request.getfixturevalue(name)
        count = reload_count(running)
        running.write_policy()
        if name == "signal_proxy":
            running.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: reload_count(running) > count), running.log()


@pytest.fixture
def patient(proxy, make_patient) -> dict:
    document = make_patient()
    proxy.client(CLINICIAN)[DATABASE][COLLECTION].insert_one(dict(document))
    return document


@pytest.fixture
def billing(proxy, patient) -> Collection:
    """The billing user's collection over one connection, opened and used before the test's reload."""
    collection = proxy.client(BILLING, maxPoolSize=1)[DATABASE][COLLECTION]
    assert not clinical_in(collection.find_one({"_id": patient["_id"]}))
    return collection


def clinical_in(document: dict | None) -> dict:
    return {field: document[field] for field in CLINICAL_FIELDS if document and field in document}


# -- a valid reload ---------------------------------------------------------------------------


def test_view_change_reaches_open_connection(proxy, billing, patient):
    count = reload_count(proxy)

    proxy.write_policy(roles=billing_sees_clinical_roles())

    found = wait_for(lambda: clinical_in(billing.find_one({"_id": patient["_id"]})))
    assert found == clinical_in(patient)
    assert reload_count(proxy) == count + 1
    assert "policy reloaded (file changed)" in proxy.log()
    assert re.search(r"conn \d+ from \S+: policy reloaded; policy roles now \['billing'\]",
                     proxy.log())


def test_row_rule_reaches_open_connection(proxy, billing, patient):
    roles = example_roles()
    roles["billing"]["rows"] = {"owner_field": "createdBy"}

    proxy.write_policy(roles=roles)

    assert wait_for(lambda: billing.find_one({"_id": patient["_id"]}) is None)


def test_identity_change_reaches_open_connection(proxy, billing, patient):
    identity = [{"mongodb_role": "billing@clinic", "roles": ["doctor"]}]

    proxy.write_policy(identity=identity)

    found = wait_for(lambda: clinical_in(billing.find_one({"_id": patient["_id"]})))
    assert found == clinical_in(patient)
    assert re.search(r"policy reloaded; policy roles now \['doctor'\]", proxy.log())


def test_new_class_encrypted_after_reload(proxy, deployment, patient):
    roles = example_roles()
    roles["doctor"]["notes"] = "clear"
    doctor = proxy.client(CLINICIAN, maxPoolSize=1)[DATABASE][COLLECTION]
    doctor.find_one({"_id": patient["_id"]})
    count = reload_count(proxy)

    proxy.write_policy(classes=["identity", "clinical", "notes"], roles=roles,
                       extra_fields={"notes": {"class": "notes"}})
    assert wait_for(lambda: reload_count(proxy) > count), proxy.log()
    doctor.update_one({"_id": patient["_id"]}, {"$set": {"notes": "seen on the ward"}})

    with deployment.client(CLINICIAN, direct=True) as direct:
        stored = direct[DATABASE][COLLECTION].find_one({"_id": patient["_id"]})
    assert isinstance(stored["notes"], Binary)
    assert stored["notes"].subtype == 6
    assert doctor.find_one({"_id": patient["_id"]})["notes"] == "seen on the ward"
    billing = proxy.client(BILLING)[DATABASE][COLLECTION]
    assert "notes" not in billing.find_one({"_id": patient["_id"]})


def test_sighup_reloads(signal_proxy, make_patient):
    patient = make_patient()
    signal_proxy.client(CLINICIAN)[DATABASE][SIGNAL_COLLECTION].insert_one(dict(patient))
    billing = signal_proxy.client(BILLING, maxPoolSize=1)[DATABASE][SIGNAL_COLLECTION]
    assert not clinical_in(billing.find_one({"_id": patient["_id"]}))

    signal_proxy.write_policy(roles=billing_sees_clinical_roles())
    time.sleep(QUIET_SECONDS)
    assert not clinical_in(billing.find_one({"_id": patient["_id"]}))
    signal_proxy.process.send_signal(signal.SIGHUP)

    found = wait_for(lambda: clinical_in(billing.find_one({"_id": patient["_id"]})))
    assert found == clinical_in(patient)
    assert "policy reloaded (SIGHUP)" in signal_proxy.log()


# -- reloads that are refused ---------------------------------------------------------------


def policy_check_error(proxy: AccessProxy) -> str:
    """Return the error that `mongoveil policy check` prints for the proxy's policy file."""
    result = run_cli(proxy.upstream, "policy", "check", str(proxy.policy_path))
    assert result.returncode != 0, result.stdout
    prefix = "mongoveil: error: "
    assert result.stderr.startswith(prefix), result.stderr
    return result.stderr[len(prefix):].strip()


def test_invalid_policy_keeps_old_one(proxy, billing, patient):
    refused = len(refusal_lines(proxy))
    count = reload_count(proxy)

    proxy.write_policy(roles=billing_sees_clinical_roles(),
                       extra_fields={"conditions": {"class": "diagnoses"}})

    assert wait_for(lambda: len(refusal_lines(proxy)) > refused), proxy.log()
    [line] = refusal_lines(proxy)[refused:]
    error = policy_check_error(proxy)
    assert "diagnoses" in error
    assert line.endswith(error), (line, error)
    assert reload_count(proxy) == count
    time.sleep(QUIET_SECONDS)
    assert not clinical_in(billing.find_one({"_id": patient["_id"]}))


def test_unparsable_policy_keeps_old_one(proxy, billing, patient):
    refused = len(refusal_lines(proxy))

    proxy.write_policy_text("roles: [unclosed\n")

    assert wait_for(lambda: len(refusal_lines(proxy)) > refused), proxy.log()
    [line] = refusal_lines(proxy)[refused:]
    assert line.endswith(policy_check_error(proxy))
    assert not clinical_in(billing.find_one({"_id": patient["_id"]}))


def test_keys_change_refused(proxy, billing, patient):
    refused = len(refusal_lines(proxy))
    count = reload_count(proxy)

    # The new file also changes billing's view, which must not take effect either.
    proxy.write_policy(key_vault=f"{KEY_VAULT}_moved", roles=billing_sees_clinical_roles())

    assert wait_for(lambda: len(refusal_lines(proxy)) > refused), proxy.log()
    [line] = refusal_lines(proxy)[refused:]
    assert "keys section" in line
    assert reload_count(proxy) == count
    time.sleep(QUIET_SECONDS)
    assert not clinical_in(billing.find_one({"_id": patient["_id"]}))


def test_valid_policy_after_refused_one(proxy, billing, patient):
    refused = len(refusal_lines(proxy))
    proxy.write_policy(extra_fields={"conditions": {"class": "diagnoses"}})
    assert wait_for(lambda: len(refusal_lines(proxy)) > refused), proxy.log()

    proxy.write_policy(roles=billing_sees_clinical_roles())

    found = wait_for(lambda: clinical_in(billing.find_one({"_id": patient["_id"]})))
    assert found == clinical_in(patient)



def test_audit_file_change_applied(proxy, patient):
    moved = proxy.folder / "audit-moved.jsonl"
    refused = len(refusal_lines(proxy))
    count = reload_count(proxy)

    proxy.write_policy(audit={"file": str(moved), "on_failure": "continue"})

    assert wait_for(lambda: reload_count(proxy) > count or len(refusal_lines(proxy)) > refused)
    if len(refusal_lines(proxy)) > refused:
        return      # refusing the change, as for the keys section, is correct too
    doctor = proxy.client(CLINICIAN)[DATABASE][COLLECTION]
    assert doctor.find_one({"_id": patient["_id"]}) == patient
    assert wait_for(lambda: moved.exists() and moved.read_text(), timeout=1.0)
