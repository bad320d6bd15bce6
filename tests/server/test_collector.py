import gc

import pytest

from proxy.server.collector import FIRST_GENERATION_THRESHOLD, tune_garbage_collector


@pytest.fixture
def restored_collector():
    """Put the collector's thresholds back and unfreeze, after the test."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_raises_first_threshold_only(restored_collector):
    _, second, third = gc.get_threshold()

    tune_garbage_collector()

    assert gc.get_threshold() == (FIRST_GENERATION_THRESHOLD, second, third)


def test_tune_freezes_existing_objects(restored_collector):
    gc.unfreeze()

    tune_garbage_collector()

    assert gc.get_freeze_count() > 0
