"""Test-suite settings: runtime shape checking on, deterministic seeds."""

import os

# Must be set before vlakit is imported anywhere: turns on jaxtyping + beartype checks.
os.environ["VLAKIT_TYPECHECK"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import vlakit  # noqa: E402, F401

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
