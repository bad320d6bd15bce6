"""Tests of proxy.metrics: the collectors, the lower layers' counters and the request meter.

The Grafana dashboard is checked here too: every metric it queries must be one
that a serving proxy exposes.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from proxy.crypto.cipher import Algorithm, ciphertext_key_id, encrypt_value
from proxy.crypto.data_key import DataKey, class_alt_name
from proxy.crypto.errors import KeyNotLoaded
from proxy.crypto.keyring import KeyRing
from proxy.metrics import (
    KNOWN_COMMANDS,
    REJECTION_REASONS,
    Metrics,
    command_label,
    rejection_reason,
    serving_metrics,
)
from proxy.policy import Policy, View, parse_policy
from proxy.rewrite import CommandError, RewriteContext, reveal_reply
from proxy.audit.chain import audit_mac_key
from proxy.policy.model import AuditSettings
from proxy.server.audit_trail import AuditTrail
from proxy.server.reload import PolicyReloader
from proxy.session.access import handle_break_glass
from proxy.session.connection import SharedState
from proxy.session.metering import RequestMeter
from proxy.wire import ProtocolError
from proxy.wire.op_msg import OpMsg, encode_op_msg, encode_op_msg_reply, peek_reply_ok

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "mongoveil.json"

SSN = "999-15-6133"
POLICY_DATA = {
    "keys": {"master_key_file": "master.key"},
    "classes": ["identity", "clinical"],
    "collections": {"clinic.patients": {"fields": {
        "ssn": {"class": "identity", "algorithm": "deterministic"},
        "phone": {"class": "identity"},
        "conditions": {"class": "clinical"},
    }}},
    "roles": {"doctor": {"identity": "clear", "clinical": "clear"}},
}


@pytest.fixture
def policy() -> Policy:
    return parse_policy(POLICY_DATA, Path("/nonexistent/policy.yaml"))


def _key(class_name: str) -> DataKey:
    return DataKey(uuid.uuid4(), os.urandom(96), (class_alt_name(class_name),))


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- labels ---------------------------------------------------------------------------


def test_command_label_known_and_unknown() -> None:
    assert command_label("find") == "find"
    assert command_label("mongoveilBreakGlass") == "mongoveilBreakGlass"
    assert command_label("999-15-6133") == "other"
    assert command_label("") == "other"
    assert command_label(None) == "other"


def test_known_commands_are_label_safe() -> None:
    for name in KNOWN_COMMANDS:
        assert re.fullmatch(r"[A-Za-z]+", name), name


def test_rejection_reason_by_code() -> None:
    assert rejection_reason(2) == "bad_value"
    assert rejection_reason(13) == "unauthorized"
    assert rejection_reason(6) == "key_unavailable"
    assert rejection_reason(211) == "key_disabled"
    assert rejection_reason(10334) == "too_large"
    assert rejection_reason(15) == "too_deep"
    assert rejection_reason(40413) == "duplicate_field"
    assert rejection_reason(12345) == "other"


def test_namespace_label_only_configured() -> None:
    metrics = Metrics(["clinic.patients"])

    assert metrics.namespace_label("clinic", "patients") == "clinic.patients"
    assert metrics.namespace_label("clinic", "notes") == ""
    assert metrics.namespace_label("clinic", None) == ""
    assert Metrics().namespace_label("clinic", "patients") == ""


def test_unknown_rejection_reason_counted_as_other() -> None:
    metrics = Metrics()

    metrics.count_rejection("free text with 999-15-6133")

    assert _value(metrics, "mongoveil_rejections_total", reason="other") == 1
    text = metrics.exposition()[0].decode()
    assert "999-15-6133" not in text


# -- registries -----------------------------------------------------------------------


def test_registries_are_separate() -> None:
    first, second = Metrics(), Metrics()

    first.record_request("find", "ok", "", 0.01)

    assert _value(first, "mongoveil_requests_total", command="find", outcome="ok",
                  namespace="") == 1
    assert _value(second, "mongoveil_requests_total", command="find", outcome="ok",
                  namespace="") is None
    assert REGISTRY.get_sample_value("mongoveil_requests_total",
                                     {"command": "find", "outcome": "ok", "namespace": ""}) is None


def test_fixed_labels_read_zero() -> None:
    metrics = Metrics()

    for reason in REJECTION_REASONS:
        assert _value(metrics, "mongoveil_rejections_total", reason=reason) == 0
    for peer in ("client", "upstream"):
        assert _value(metrics, "mongoveil_received_bytes_total", peer=peer) == 0
        assert _value(metrics, "mongoveil_sent_bytes_total", peer=peer) == 0
    assert _value(metrics, "mongoveil_frames_total", direction="reply", handling="passed") == 0


def test_serving_metrics_process_collectors() -> None:
    metrics = serving_metrics()
    text = metrics.exposition()[0].decode()

    assert "process_cpu_seconds_total" in text
    assert "python_gc_collections_total" in text
    assert "_created" not in text


def test_exposition_openmetrics_on_request() -> None:
    metrics = Metrics()

    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")

    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    assert Metrics().exposition()[1].startswith("text/plain")


# -- counters of the session ---------------------------------------------------------


def test_request_and_latency() -> None:
    metrics = Metrics()

    metrics.record_request("insert", "error", "", 0.004)
    metrics.record_request("insert", "ok", "", 0.2)

    assert _value(metrics, "mongoveil_requests_total", command="insert", outcome="ok",
                  namespace="") == 1
    assert _value(metrics, "mongoveil_request_duration_seconds_count", command="insert") == 2
    assert _value(metrics, "mongoveil_request_duration_seconds_bucket", command="insert",
                  le="0.005") == 1
    assert _value(metrics, "mongoveil_request_duration_seconds_sum",
                  command="insert") == pytest.approx(0.204)


def test_reply_values_unknown_class_other() -> None:
    metrics = Metrics()

    metrics.count_reply_values({("identity", "clear"): 3, ("gone", "ciphertext"): 2,
                                (None, "redact"): 1}, ["identity", "clinical"])

    assert _value(metrics, "mongoveil_reply_values_total", **{"class": "identity",
                                                              "view": "clear"}) == 3
    assert _value(metrics, "mongoveil_reply_values_total", **{"class": "other",
                                                              "view": "ciphertext"}) == 2
    assert _value(metrics, "mongoveil_reply_values_total", **{"class": "other",
                                                              "view": "redact"}) == 1


def test_bytes_and_frames() -> None:
    metrics = Metrics()

    metrics.count_received("client", 100)
    metrics.count_sent("upstream", 120)
    metrics.count_frame("request", rewritten=True)
    metrics.count_frame("reply", rewritten=False)

    assert _value(metrics, "mongoveil_received_bytes_total", peer="client") == 100
    assert _value(metrics, "mongoveil_sent_bytes_total", peer="upstream") == 120
    assert _value(metrics, "mongoveil_frames_total", direction="request",
                  handling="rewritten") == 1
    assert _value(metrics, "mongoveil_frames_total", direction="reply", handling="passed") == 1


def test_latency_bucket_bounds_inclusive() -> None:
    metrics = Metrics()

    metrics.record_request("find", "ok", "", 0.005)     # exactly a bucket's upper bound
    metrics.record_request("find", "ok", "", 0.0051)
    metrics.record_request("find", "ok", "", 100.0)      # above the last bound

    def bucket(le: str) -> float | None:
        return _value(metrics, "mongoveil_request_duration_seconds_bucket", command="find", le=le)

    assert bucket("0.0025") == 0
    assert bucket("0.005") == 1
    assert bucket("0.01") == 2
    assert bucket("30.0") == 2
    assert bucket("+Inf") == 3
    assert _value(metrics, "mongoveil_request_duration_seconds_count", command="find") == 3
    assert _value(metrics, "mongoveil_request_duration_seconds_sum",
                  command="find") == pytest.approx(100.0101)


def test_traffic_counters_per_label() -> None:
    metrics = Metrics(["clinic.patients"])

    metrics.record_request("find", "ok", "clinic.patients", 0.001)
    metrics.record_request("find", "error", "", 0.001)
    metrics.record_request("find", "ok", "clinic.patients", 0.001)
    for _ in range(3):
        metrics.count_frame("reply", rewritten=True)
    metrics.count_received("upstream", 7)
    metrics.count_received("upstream", 8)

    assert _requests(metrics, "find", "ok", "clinic.patients") == 2
    assert _requests(metrics, "find", "error") == 1
    assert _value(metrics, "mongoveil_frames_total", direction="reply", handling="rewritten") == 3
    assert _value(metrics, "mongoveil_frames_total", direction="request", handling="passed") == 0
    assert _value(metrics, "mongoveil_received_bytes_total", peer="upstream") == 15


# -- request meter --------------------------------------------------------------------


def _reply(body: dict) -> bytes:
    return encode_op_msg_reply(body, response_to=1, request_id=2)


def _requests(metrics: Metrics, command: str, outcome: str, namespace: str = "") -> float | None:
    return _value(metrics, "mongoveil_requests_total", command=command, outcome=outcome,
                  namespace=namespace)


def test_meter_ok_reply() -> None:
    metrics = Metrics(["clinic.patients"])
    meter = RequestMeter(metrics)

    meter.identify("find", "clinic", "patients")
    meter.reply_frame(_reply({"cursor": {"firstBatch": [], "id": 0}, "ok": 1.0}))
    meter.finish()

    assert _requests(metrics, "find", "ok", "clinic.patients") == 1


def test_meter_error_sticks() -> None:
    metrics = Metrics()
    meter = RequestMeter(metrics)

    meter.identify("getMore")
    meter.reply_frame(_reply({"ok": 0.0, "errmsg": "cursor not found", "code": 43}))
    meter.reply_frame(_reply({"ok": 1.0}))
    meter.finish()

    assert _requests(metrics, "getMore", "error") == 1
    assert _requests(metrics, "getMore", "ok") is None


def test_meter_without_reply_failed() -> None:
    metrics = Metrics()
    meter = RequestMeter(metrics)

    meter.identify("aggregate")
    meter.finish()

    assert _requests(metrics, "aggregate", "failed") == 1


def test_meter_rejection() -> None:
    metrics = Metrics()
    meter = RequestMeter(metrics)

    meter.identify("find", "clinic", "patients")
    meter.reject_code(2)
    meter.finish()

    assert _requests(metrics, "find", "rejected") == 1
    assert _value(metrics, "mongoveil_rejections_total", reason="bad_value") == 1


def test_meter_compressed_reply_unknown() -> None:
    metrics = Metrics()
    meter = RequestMeter(metrics)

    meter.identify("find")
    meter.reply_frame(None)
    meter.finish()

    assert _requests(metrics, "find", "unknown") == 1


def test_meter_invented_command_other() -> None:
    metrics = Metrics()
    meter = RequestMeter(metrics)

    meter.identify(SSN, "clinic", "patients")
    meter.reply_body({"ok": 0.0})
    meter.finish()

    assert _requests(metrics, "other", "error") == 1
    assert SSN not in metrics.exposition()[0].decode()


def test_meter_unacknowledged() -> None:
    metrics = Metrics()
    meter = RequestMeter(metrics)

    meter.identify("insert")
    meter.unacknowledged()
    meter.finish()

    assert _requests(metrics, "insert", "unacknowledged") == 1


# -- peek_reply_ok --------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expected"), [
    ({"ok": 1.0}, True),
    ({"ok": 1}, True),
    ({"ok": True}, True),
    ({"ok": 0.0, "errmsg": "failed", "code": 2}, False),
    ({"cursor": {"ok": 0}, "ok": 1.0}, True),
    ({"cursor": {"ok": 1}}, None),
    ({"ok": "1"}, None),
])
def test_peek_reply_ok(body: dict, expected: bool | None) -> None:
    assert peek_reply_ok(_reply(body)) is expected


def test_peek_reply_ok_with_sequence() -> None:
    frame = encode_op_msg(OpMsg(0, {"ok": 0.0}, []), 5, 6)

    assert peek_reply_ok(frame) is False


def test_peek_reply_ok_malformed() -> None:
    frame = bytearray(_reply({"ok": 1.0}))
    frame[21] = 0xFF        # the body's length no longer fits the frame

    with pytest.raises(ProtocolError):
        peek_reply_ok(bytes(frame))


# -- key ring counters ---------------------------------------------------------------


def test_keyring_counts_encryptions_by_class() -> None:
    ring = KeyRing()
    ring.add(_key("identity"))

    ring.encrypt(SSN, "identity", Algorithm.DETERMINISTIC)
    ring.encrypt("555-0100", "identity", Algorithm.RANDOM)
    with pytest.raises(KeyNotLoaded):
        ring.encrypt(["asthma"], "clinical", Algorithm.RANDOM)

    assert ring.encryptions == {"identity": 2}
    assert ring.cache_hits == 2
    assert ring.cache_misses == 1


def test_keyring_counts_decryptions() -> None:
    ring = KeyRing()
    key = _key("clinical")
    ring.add(key)
    unknown = _key("identity")

    ring.decrypt(encrypt_value(["asthma"], key, Algorithm.RANDOM))
    with pytest.raises(KeyNotLoaded):
        ring.decrypt(encrypt_value(SSN, unknown, Algorithm.RANDOM))

    assert ring.decryptions == {"clinical": 1}
    assert ring.cache_hits == 1
    assert ring.cache_misses == 1


def test_keyring_subject_lookups() -> None:
    ring = KeyRing()
    ring.add(_key("clinical"))
    subject = "patient-1"
    alt_name = ring.subject_alt_name("clinical", subject)
    assert ring.cache_hits == 1

    with pytest.raises(KeyNotLoaded):
        ring.encrypt_for_subject(["asthma"], "clinical", subject, Algorithm.RANDOM)
    ring.add(DataKey(uuid.uuid4(), os.urandom(96), (alt_name,)))
    ring.encrypt_for_subject(["asthma"], "clinical", subject, Algorithm.RANDOM)

    # Each encryption looks up the class key, then the subject's key.
    assert ring.cache_misses == 1
    assert ring.cache_hits == 4
    assert ring.encryptions == {"clinical": 1}


def test_collector_reads_keyring(policy: Policy) -> None:
    metrics = Metrics()
    ring = KeyRing()
    ring.add(_key("identity"))
    ring.add(DataKey(uuid.uuid4(), os.urandom(96), (class_alt_name("retired_class"),)))
    metrics.watch(ring=ring, shared=SharedState(policy, metrics))

    ring.encrypt(SSN, "identity", Algorithm.DETERMINISTIC)
    ring.encrypt(SSN, "retired_class", Algorithm.DETERMINISTIC)
    ring.decrypt(ring.encrypt(SSN, "identity", Algorithm.RANDOM))

    assert _value(metrics, "mongoveil_encryptions_total", **{"class": "identity"}) == 2
    assert _value(metrics, "mongoveil_encryptions_total", **{"class": "other"}) == 1
    assert _value(metrics, "mongoveil_decryptions_total", **{"class": "identity"}) == 1
    assert _value(metrics, "mongoveil_key_cache_hits_total") == 4
    assert _value(metrics, "mongoveil_key_cache_misses_total") == 0


def test_collector_without_sources() -> None:
    metrics = Metrics()

    assert _value(metrics, "mongoveil_key_cache_hits_total") == 0
    assert _value(metrics, "mongoveil_audit_records_written_total") == 0
    assert _value(metrics, "mongoveil_policy_reloads_total") == 0
    assert _value(metrics, "mongoveil_break_glass_grants_total") == 0


# -- reveal_reply tally --------------------------------------------------------------


def test_reveal_counts_values_by_view(policy: Policy) -> None:
    ring = KeyRing()
    identity, clinical = _key("identity"), _key("clinical")
    ring.add(identity)
    ring.add(clinical)
    unloaded = encrypt_value(SSN, _key("identity"), Algorithm.RANDOM)
    context = RewriteContext(policy, ring, {"identity": View.MASK, "clinical": View.REDACT})
    body = {"cursor": {"firstBatch": [
        {"ssn": encrypt_value(SSN, identity, Algorithm.RANDOM),
         "phone": encrypt_value("555-0100", identity, Algorithm.RANDOM),
         "conditions": encrypt_value(["asthma"], clinical, Algorithm.RANDOM)},
        {"ssn": unloaded},
    ], "id": 0}, "ok": 1.0}
    view_counts: dict = {}

    reveal_reply(body, context, view_counts=view_counts,
                 unavailable_keys={ciphertext_key_id(unloaded)})

    # The value whose key could not be loaded gets on_key_error (ciphertext), without a class.
    assert view_counts == {("identity", "mask"): 2, ("clinical", "redact"): 1,
                     (None, "ciphertext"): 1}


def test_reveal_without_tally(policy: Policy) -> None:
    ring = KeyRing()
    identity = _key("identity")
    ring.add(identity)
    context = RewriteContext(policy, ring, {"identity": View.CLEAR, "clinical": View.CLEAR})

    body = reveal_reply({"ssn": encrypt_value(SSN, identity, Algorithm.RANDOM)}, context)

    assert body == {"ssn": SSN}


# -- audit, break-glass and reload counters ------------------------------------------


async def test_collector_reads_audit_grants_reloads(policy: Policy, tmp_path: Path) -> None:
    metrics = Metrics()
    shared = SharedState(policy, metrics)
    trail = AuditTrail(AuditSettings(file=tmp_path / "audit.jsonl"), audit_mac_key(bytes(96)),
                       max_queued=2)
    shared.audit = trail
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text("not: a policy\n")
    reloader = PolicyReloader(policy_path, policy, shared.replace_policy)
    metrics.watch(shared=shared, reloader=reloader)

    for index in range(3):
        await trail.record("command", {"namespace": "clinic.patients", "documents": index})
    reloader.reload("test")
    with pytest.raises(CommandError):
        handle_break_glass({"mongoveilBreakGlass": 1, "reason": "test"}, None, frozenset(),
                           policy, shared.grants, datetime.datetime.now(datetime.timezone.utc))

    assert _value(metrics, "mongoveil_audit_records_dropped_total") == 1
    assert _value(metrics, "mongoveil_audit_records_queued") == 2
    assert _value(metrics, "mongoveil_policy_reload_failures_total") == 1
    assert _value(metrics, "mongoveil_policy_reloads_total") == 0
    assert _value(metrics, "mongoveil_break_glass_rejections_total") == 1

    await trail.start()
    await trail.close()
    assert _value(metrics, "mongoveil_audit_records_written_total") == 2
    assert _value(metrics, "mongoveil_audit_write_failures_total") == 0


# -- Grafana dashboard ---------------------------------------------------------------


def _exposed_names() -> set[str]:
    """Return every sample name a serving proxy exposes, from the TYPE lines of a scrape."""
    text = serving_metrics().exposition()[0].decode()
    names = set()
    for line in text.splitlines():
        match = re.match(r"# TYPE (\S+) (\S+)", line)
        if not match:
            continue
        name, kind = match.groups()
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = []
    for panel in dashboard["panels"]:
        expressions += [target["expr"] for target in panel.get("targets", [])]
    return expressions


def test_dashboard_valid_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())

    assert dashboard["title"] == "mongoveil"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert len(_dashboard_expressions()) >= 20


def test_dashboard_metrics_exist() -> None:
    exposed = _exposed_names()
    # PromQL functions and keywords are followed by "(", label names by "=" or "!",
    # so a metric is any identifier of the known prefixes.
    used = set()
    for expression in _dashboard_expressions():
        used |= set(re.findall(r"\b((?:mongoveil|process|python)_[a-z0-9_]+)", expression))

    assert used
    assert used - exposed == set()


def test_dashboard_covers_every_mongoveil_metric() -> None:
    exposed = {name for name in _exposed_names() if name.startswith("mongoveil_")}
    text = " ".join(_dashboard_expressions())
    histogram_parts = {name for name in exposed if name.endswith(("_sum", "_count"))}

    missing = {name for name in exposed - histogram_parts if name not in text}

    assert missing == set()
