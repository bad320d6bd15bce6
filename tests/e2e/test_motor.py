"""End to end: Motor (asyncio) runs the client scenario through the proxy.

The scenario is the one of client_scenario.py, whose tests this module
imports, run with the async steps of python_scenario.py on Motor's
AsyncIOMotorClient. Only the Motor version and the compressor of each pooled
connection are checked here.

Motor 3.7 runs pymongo's synchronous client in a thread pool, so this covers
another code path than pymongo's own AsyncMongoClient in
test_pymongo_scenario.py and test_async_client.py.
"""

from __future__ import annotations

import asyncio
import operator

import motor
import pytest
from motor.motor_asyncio import AsyncIOMotorClient

from client_scenario import COMPRESSOR_IDS, COMPRESSORS, scenario_run
# pytest collects these tests and finds the `stored` fixture by their names in
# this module's namespace, so importing them is enough.
from client_scenario import (  # noqa: F401
    stored, test_aggregate_match_on_ssn, test_billing_sees_no_clinical_fields,
    test_change_stream_hides_clinical_fields, test_change_stream_operation_types,
    test_change_stream_ssn_revealed, test_delete_by_ssn, test_find_by_ssn_after_set,
    test_find_in_batches_of_two, test_insert_many_count, test_protected_fields_stored_encrypted,
    test_regex_on_ssn_rejected, test_set_on_protected_field, test_transaction_abort_leaves_nothing,
    test_transaction_commit_read_back, test_transaction_stored_encrypted,
    test_unprotected_collection_round_trip,
)
from python_scenario import AsyncDriver, async_scenario

# Motor's client wraps a pymongo MongoClient, its `delegate`.
MOTOR = AsyncDriver("motor", motor.version, AsyncIOMotorClient, operator.attrgetter("delegate"))


def run_motor_scenario(clinician_uri: str, billing_uri: str, scenario: dict) -> dict:
    return asyncio.run(async_scenario(MOTOR, clinician_uri, billing_uri, scenario))


@pytest.fixture(scope="module", params=COMPRESSORS, ids=COMPRESSOR_IDS)
def run(request, deployment, connect, make_patient):
    """Run the scenario once per compressor with new patients, then delete what it wrote."""
    with scenario_run(request.param, deployment, connect, make_patient,
                      run_motor_scenario) as result:
        yield result


def test_motor_version(run):
    assert run.output["client"]["name"] == "motor"
    assert run.output["client"]["version"].startswith("3.")


def test_connections_negotiate_compressor(run):
    compressors = run.output["compression"]

    assert len(compressors) >= 1
    assert set(compressors) == {run.compressor}
