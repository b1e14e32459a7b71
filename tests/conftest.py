"""Fixtures shared by the test modules; plain helpers are in ``tests/helpers.py``."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The tiny model (``stepvideo.tiny``), written once per test session. Read-only for tests."""
    from stepvideo.tiny import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny_model")), seed=0)
