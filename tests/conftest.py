from __future__ import annotations

from typing import Iterator

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """The mask methods a test registers must not outlive it (the docs test lists every method)."""
    from fx_sparsify.methods._registry import _ALIASES, _REGISTRY

    saved = (dict(_REGISTRY), dict(_ALIASES))
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved[0])
    _ALIASES.clear()
    _ALIASES.update(saved[1])
