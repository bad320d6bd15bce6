"""End to end: the Node.js driver 6 runs the client scenario through the proxy.

tests/clients/scenario.mjs runs the steps of client_scenario.py, whose tests
this module imports, and prints what each step returned as Extended JSON.
Only the driver version and the compressors the proxy's handshake reply
accepted are checked here.

The driver comes from tests/clients/node_modules, which `make test` installs
with `npm ci`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from client_scenario import (
    CLIENTS, COMPRESSOR_IDS, COMPRESSORS, require_node_package, run_client_script, scenario_run,
    write_scenario_input,
)
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

SCENARIO = CLIENTS / "scenario.mjs"
DRIVER_PACKAGE = CLIENTS / "node_modules" / "mongodb" / "package.json"


def run_node_scenario(folder: Path, clinician_uri: str, billing_uri: str, scenario: dict) -> dict:
    """Run scenario.mjs on the input written to `folder` and return its parsed output."""
    input_path = write_scenario_input(folder, scenario)
    environment = dict(os.environ, CLINICIAN_URI=clinician_uri, BILLING_URI=billing_uri)
    return run_client_script(["node", str(SCENARIO), str(input_path)], environment, SCENARIO.name)


@pytest.fixture(scope="module", params=COMPRESSORS, ids=COMPRESSOR_IDS)
def run(request, deployment, connect, make_patient, tmp_path_factory):
    """Run scenario.mjs once per compressor with new patients, then delete what it wrote."""
    require_node_package(DRIVER_PACKAGE)
    client = functools.partial(run_node_scenario, tmp_path_factory.mktemp("node-scenario"))

    with scenario_run(request.param, deployment, connect, make_patient, client) as result:
        yield result


def test_driver_version(run):
    assert run.output["client"]["name"] == "nodejs"
    assert run.output["client"]["version"].startswith("6.")


def test_handshake_negotiates_compressor(run):
    expected = [run.compressor] if run.compressor else []

    assert run.output["compression"] == expected
