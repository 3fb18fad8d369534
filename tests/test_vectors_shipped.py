"""The suite carries its own data: the MLS vectors live in tests/vectors/,
match their recorded digests, are described by its README, and nothing in
tests/ or scripts/ reaches outside the checkout for them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tests.vectorfiles import VECTORS

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_COMMIT = "cfd450286d1bfd9cd2519b95c80f9771f94a5b1a"


def recorded() -> dict[str, str]:
    lines = (VECTORS / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def test_every_vector_file_is_in_the_checkout_with_its_digest():
    sums = recorded()
    assert len(sums) == 11
    for name, digest in sums.items():
        data = (VECTORS / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
    on_disk = {p.relative_to(VECTORS).as_posix() for p in VECTORS.rglob("*.json")}
    assert on_disk == set(sums)


def test_the_readme_names_source_commit_files_subsets_and_license():
    readme = (VECTORS / "README.md").read_text()
    assert "mlswg/mls-implementations" in readme and UPSTREAM_COMMIT in readme
    assert "no license file" in readme
    for name in recorded():
        assert f"| {name} |" in readme, name  # each file has its row (source, entries kept)


def test_nothing_in_tests_or_scripts_reads_outside_the_checkout():
    pattern = re.compile(r"\.\./shared|shared/mls-vectors|parent\s*/\s*\"shared\"")
    offenders = []
    for folder in ("tests", "scripts"):
        for path in (ROOT / folder).rglob("*"):
            if not path.is_file() or "vectors" in path.relative_to(ROOT).parts[:2]:
                continue
            if path.suffix not in ("", ".py", ".sh", ".js", ".json", ".md", ".mjs"):
                continue
            if path == Path(__file__):
                continue
            text = path.read_text(errors="replace")
            offenders += [f"{path.relative_to(ROOT)}" for _ in pattern.finditer(text)]
    assert offenders == []
