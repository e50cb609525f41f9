"""Fixtures shared by every test: throwaway PKI (minted at test time) and the emulated API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from kubemtls_operator import pki
from testkit import CRD_FILE, TestPKI, utcnow


@pytest.fixture(scope="session")
def test_pki() -> TestPKI:
    """One root CA for the session (key generation is the slow part)."""
    return TestPKI(ca=pki.bootstrap_ca(now=utcnow(), common_name="kubemtls test root"))


@pytest.fixture(scope="session")
def other_pki() -> TestPKI:
    """An unrelated CA: its leaves must be refused as unknown_ca."""
    return TestPKI(ca=pki.bootstrap_ca(now=utcnow(), common_name="some other root"))


@pytest.fixture
async def k8s() -> AsyncIterator[object]:
    """The emulated API server on this test's event loop, with the MTLSCert CRD loaded.

    Yields a ``RunningAPI`` (``.url``, ``.emulator``, ``.write_kubeconfig(path)``). Never
    block this loop (no ``time.sleep``): it serves the API.
    """
    from kubemtls_operator.emu import runtime

    async with runtime.serve(crd_files=[str(CRD_FILE)], admission=True) as api:
        yield api
