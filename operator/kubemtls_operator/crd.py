"""Where the MTLSCert CRD file is: the wheel's package data first, the repo's chart second.

The chart's ``crds/mtlscerts.yaml`` is the single source; the wheel force-includes it as
``kubemtls_operator/data/mtlscerts.yaml``. An editable install has no ``data/`` folder, so
the loader falls back to the repository path.
"""

from __future__ import annotations

import importlib.resources
import pathlib
from typing import Any

import yaml

__all__ = ["crd_path", "load_crd"]

_REPO_FILE = (
    pathlib.Path(__file__).resolve().parents[2] / "charts" / "kubemtls" / "crds" / "mtlscerts.yaml"
)


def crd_path() -> pathlib.Path:
    """The CRD file's path.

    Raises:
        FileNotFoundError: neither in the package nor in the repository.
    """
    packaged = importlib.resources.files("kubemtls_operator") / "data" / "mtlscerts.yaml"
    if packaged.is_file():
        return pathlib.Path(str(packaged))
    if _REPO_FILE.is_file():
        return _REPO_FILE
    raise FileNotFoundError("mtlscerts.yaml is neither in kubemtls_operator/data nor in charts/")


def load_crd() -> dict[str, Any]:
    """The CRD as a dict."""
    data = yaml.safe_load(crd_path().read_text())
    assert isinstance(data, dict)
    return data
