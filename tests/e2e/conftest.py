"""Fixtures for the end-to-end test: one run of ``kubemtls demo``, shared by its assertions.

The demo is driven through its Python API (``script.run``), which returns one structured
``Scene`` per outcome, so each test asserts on observed facts rather than on printed text.
It runs once per module (it takes most of a minute), in network namespaces when root.
"""

from __future__ import annotations

import io

import pytest
from kubemtls_operator.demo import report, script


@pytest.fixture(scope="module")
def demo_run() -> report.Result:
    result = script.run(script.Options(), io.StringIO())
    print("\n".join(result.output))  # shown by pytest when a test fails
    return result
