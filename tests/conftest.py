"""Suite-wide pytest set-up: the `slow` marker.

Tests marked `slow` (the full-size rows of the hardware team's golden grids, see
tests/test_golden_*.py) run with everything else, as CI runs them; deselect them for a
quick local run with `pytest -m "not slow"`.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: full-size golden rows (deselect: -m 'not slow')")
