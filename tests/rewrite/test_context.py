"""Tests of RewriteContext.scope."""

from __future__ import annotations

from proxy.rewrite.context import RewriteContext

from .conftest import NAMESPACE


def test_scope_protected(ctx: RewriteContext) -> None:
    scope = ctx.scope(NAMESPACE)

    assert scope is not None
    assert scope.namespace == NAMESPACE
    assert scope.keys is ctx.keys
    assert "ssn" in scope.collection.fields


def test_scope_unprotected(ctx: RewriteContext) -> None:
    assert ctx.scope("clinic.visits") is None
