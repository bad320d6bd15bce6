"""Tests for the identity helpers: when authentication ends, and who `connectionStatus` names."""

from __future__ import annotations

import pytest

from proxy.session.identity import (
    AUTH_COMMANDS,
    CONNECTION_STATUS_COMMAND,
    Identity,
    auth_finished,
    parse_connection_status,
)


def connection_status_reply(users: list[tuple[str, str]], roles: list[tuple[str, str]]) -> dict:
    return {
        "authInfo": {
            "authenticatedUsers": [{"user": user, "db": db} for user, db in users],
            "authenticatedUserRoles": [{"role": role, "db": db} for role, db in roles],
        },
        "ok": 1.0,
    }


# -- Identity ------------------------------------------------------------------


def test_identity_default_empty():
    identity = Identity()

    assert identity.users == ()
    assert identity.mongodb_roles == ()
    assert identity.policy_roles == frozenset()


def test_identity_describe_unauthenticated():
    assert Identity().describe() == "unauthenticated"


def test_identity_describe_users():
    identity = Identity(users=(("drhouse", "clinic"), ("auditor", "admin")))

    assert identity.describe() == "drhouse@clinic,auditor@admin"


def test_identity_frozen():
    identity = Identity()

    with pytest.raises(AttributeError):
        identity.users = (("mallory", "admin"),)


# -- commands -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["saslStart", "saslContinue", "authenticate", "logout"])
def test_auth_commands_known(name):
    assert name in AUTH_COMMANDS


def test_connection_status_command():
    assert CONNECTION_STATUS_COMMAND == {"connectionStatus": 1, "$db": "admin"}


# -- auth_finished ----------------------------------------------------------------


def test_sasl_start_not_done():
    reply = {"conversationId": 1, "done": False, "payload": b"r=abc", "ok": 1.0}

    assert auth_finished("saslStart", reply) is False


def test_sasl_start_done():
    # A mechanism such as PLAIN finishes in saslStart.
    assert auth_finished("saslStart", {"conversationId": 1, "done": True, "ok": 1.0}) is True


def test_sasl_continue_not_done():
    reply = {"conversationId": 1, "done": False, "payload": b"v=xyz", "ok": 1.0}

    assert auth_finished("saslContinue", reply) is False


def test_sasl_continue_done():
    assert auth_finished("saslContinue", {"conversationId": 1, "done": True, "ok": 1.0}) is True


def test_sasl_continue_missing_done():
    assert auth_finished("saslContinue", {"conversationId": 1, "ok": 1.0}) is False


@pytest.mark.parametrize("name", ["saslStart", "saslContinue", "authenticate", "logout"])
def test_failed_reply_not_finished(name):
    reply = {"ok": 0.0, "errmsg": "Authentication failed.", "code": 18, "done": True}

    assert auth_finished(name, reply) is False


@pytest.mark.parametrize("name", ["authenticate", "logout"])
def test_one_step_commands_finished(name):
    assert auth_finished(name, {"ok": 1.0}) is True


def test_ok_as_int_accepted():
    # Servers send ok as a double, but 1 (int32) compares equal and must count too.
    assert auth_finished("logout", {"ok": 1}) is True


def test_hello_without_speculative():
    assert auth_finished("hello", {"isWritablePrimary": True, "ok": 1.0}) is False


def test_hello_speculative_scram_pending():
    reply = {"isWritablePrimary": True,
             "speculativeAuthenticate": {"conversationId": 1, "done": False, "payload": b"r="},
             "ok": 1.0}

    assert auth_finished("hello", reply) is False


def test_hello_speculative_scram_done():
    reply = {"speculativeAuthenticate": {"conversationId": 1, "done": True}, "ok": 1.0}

    assert auth_finished("hello", reply) is True


def test_hello_speculative_x509():
    # X.509 has no conversation: the reply names the user and authentication is complete.
    reply = {"ismaster": True, "speculativeAuthenticate": {"dbname": "$external", "user": "CN=app"},
             "ok": 1.0}

    assert auth_finished("isMaster", reply) is True


def test_hello_speculative_not_document():
    assert auth_finished("hello", {"speculativeAuthenticate": "yes", "ok": 1.0}) is False


def test_hello_failed_with_speculative():
    reply = {"speculativeAuthenticate": {"dbname": "$external"}, "ok": 0.0}

    assert auth_finished("hello", reply) is False


def test_other_command_not_finished():
    assert auth_finished("ping", {"ok": 1.0}) is False


# -- parse_connection_status ------------------------------------------------------------


def test_parse_users_and_roles():
    reply = connection_status_reply([("drhouse", "clinic")],
                                    [("clinician", "clinic"), ("read", "reports")])

    users, roles = parse_connection_status(reply)

    assert users == (("drhouse", "clinic"),)
    assert roles == (("clinician", "clinic"), ("read", "reports"))


def test_parse_unauthenticated():
    users, roles = parse_connection_status(connection_status_reply([], []))

    assert users == ()
    assert roles == ()


def test_parse_missing_lists():
    users, roles = parse_connection_status({"authInfo": {}, "ok": 1.0})

    assert users == ()
    assert roles == ()


def test_parse_ignores_extra_fields():
    reply = connection_status_reply([("auditor", "admin")], [("read", "clinic")])
    reply["authInfo"]["authenticatedUsers"][0]["mechanism"] = "SCRAM-SHA-256"
    reply["$clusterTime"] = {"clusterTime": 1}

    users, _roles = parse_connection_status(reply)

    assert users == (("auditor", "admin"),)


def test_parse_error_reply():
    reply = {"ok": 0.0, "errmsg": "command connectionStatus requires authentication", "code": 13}

    with pytest.raises(ValueError, match="connectionStatus failed: command connectionStatus"):
        parse_connection_status(reply)


def test_parse_error_without_errmsg():
    with pytest.raises(ValueError, match="no errmsg"):
        parse_connection_status({"ok": 0.0})


def test_parse_missing_auth_info():
    with pytest.raises(ValueError, match="no authInfo"):
        parse_connection_status({"ok": 1.0})


def test_parse_auth_info_not_document():
    with pytest.raises(ValueError, match="no authInfo"):
        parse_connection_status({"authInfo": ["drhouse"], "ok": 1.0})
