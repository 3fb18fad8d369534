"""Where the MLS working group's test vectors live: ``tests/vectors/`` of this
checkout (see its README.md for source, commit and subsets).

They ship with the repository, so a missing file is a broken checkout, not a
missing service: it fails the test instead of skipping it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parent / "vectors"


def vector_path(name: str) -> Path:
    path = VECTORS / name
    if not path.is_file():
        pytest.fail(f"MLS test vector {name} missing from {VECTORS} (broken checkout?)")
    return path


def load_vectors(name: str) -> Any:
    return json.loads(vector_path(name).read_text())
