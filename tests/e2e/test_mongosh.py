"""End to end: mongosh runs the client scenario through the proxy.

tests/clients/scenario.mongosh.js runs the steps of client_scenario.py, whose
tests this module imports, in mongosh, which connects as the clinician with
the URI on its command line. It prints what each step returned as Extended
JSON. Checked here are the shell version, the compressor of each pooled
connection, and the batch sizes, because mongosh counts no getMore commands.

mongosh comes from tests/clients/node_modules, which `make test` installs
with `npm ci`. It runs with HOME set to a temporary folder, so it reads no
user configuration and writes its log there, and with its telemetry turned
off, so it opens no connection other than to the proxy.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from client_scenario import (
    BATCH_SIZE, CLIENTS, COMPRESSOR_IDS, COMPRESSORS, PATIENT_COUNT, assert_batch_documents,
    require_node_package, run_client_script, scenario_run, write_scenario_input,
)
# pytest collects these tests and finds the `stored` fixture by their names in
# this module's namespace, so importing them is enough.
from client_scenario import (  # noqa: F401
    stored, test_aggregate_match_on_ssn, test_billing_sees_no_clinical_fields,
    test_change_stream_hides_clinical_fields, test_change_stream_operation_types,
    test_change_stream_ssn_revealed, test_delete_by_ssn, test_find_by_ssn_after_set,
    test_insert_many_count, test_protected_fields_stored_encrypted, test_regex_on_ssn_rejected,
    test_set_on_protected_field, test_transaction_abort_leaves_nothing,
    test_transaction_commit_read_back, test_transaction_stored_encrypted,
    test_unprotected_collection_round_trip,
)

SCENARIO = CLIENTS / "scenario.mongosh.js"
MONGOSH = CLIENTS / "node_modules" / ".bin" / "mongosh"
# mongosh reads these at start-up. An empty telemetry endpoint makes it create
# no telemetry client at all, and the second variable turns tracking off.
NO_TELEMETRY = {"MONGOSH_TELEMETRY_ENDPOINT": "",
                "MONGOSH_FORCE_DISABLE_TELEMETRY_FOR_TESTING": "1"}


def run_mongosh_scenario(home: Path, clinician_uri: str, billing_uri: str, scenario: dict) -> dict:
    """Run scenario.mongosh.js with HOME set to `home` and return its parsed output.

    The input file goes into `home` as well.
    """
    input_path = write_scenario_input(home, scenario)
    environment = dict(os.environ, HOME=str(home), SCENARIO_INPUT=str(input_path),
                       BILLING_URI=billing_uri, **NO_TELEMETRY)
    command = [str(MONGOSH), clinician_uri, "--quiet", "--norc", "--file", str(SCENARIO)]
    return run_client_script(command, environment, SCENARIO.name)


@pytest.fixture(scope="module", params=COMPRESSORS, ids=COMPRESSOR_IDS)
def run(request, deployment, connect, make_patient, tmp_path_factory):
    """Run scenario.mongosh.js once per compressor with new patients, then delete what it wrote."""
    require_node_package(MONGOSH)
    client = functools.partial(run_mongosh_scenario, tmp_path_factory.mktemp("mongosh-scenario"))

    with scenario_run(request.param, deployment, connect, make_patient, client) as result:
        yield result


def test_shell_version(run):
    assert run.output["client"]["name"] == "mongosh"
    assert run.output["client"]["version"].startswith("2.")


def test_connections_negotiate_compressor(run):
    compressors = run.output["compression"]

    assert len(compressors) >= 1
    assert set(compressors) == {run.compressor}


def test_find_in_batches_of_two(run):
    assert_batch_documents(run)
    assert run.output["batches"]["sizes"] == [BATCH_SIZE] * (PATIENT_COUNT // BATCH_SIZE)
