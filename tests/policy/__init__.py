"""Tests of the policy layer (a package, so module names cannot clash with other layers' tests)."""
