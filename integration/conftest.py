"""pytest fixtures for real-stack tests (see integration/harness/ and docs/operators.md).

* ``registry``        — a started :class:`Registry` (plain HTTP, no auth), stopped after the test.
* ``registry_factory``— ``registry_factory(users=..., extra_config=..., config_hook=...)`` starts
                        more (auth, token, ...) registries; all are stopped after the test.
"""

from __future__ import annotations

import shutil
from typing import Any, Callable, Iterator

import pytest

from integration.harness.registry import Registry


def _need(binary: str, package: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} not installed (Debian package {package})")


@pytest.fixture
def registry_factory() -> Iterator[Callable[..., Registry]]:
    _need("docker-registry", "docker-registry")
    started: list[Registry] = []

    def make(**kw: Any) -> Registry:
        reg = Registry(**kw)
        started.append(reg)
        return reg.start()

    try:
        yield make
    finally:
        for reg in reversed(started):
            reg.stop()


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    return registry_factory()
