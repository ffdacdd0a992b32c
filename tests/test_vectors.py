"""The upstream vectors in tests/vectors are intact copies: every file listed in SHA256SUMS, no other."""

from __future__ import annotations

import hashlib


def test_vectors_match_their_checksums(vectors_dir):
    listed = {}
    for line in (vectors_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = {str(p.relative_to(vectors_dir)) for p in vectors_dir.rglob("*")
               if p.is_file() and p.parent != vectors_dir}
    assert present == set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((vectors_dir / name).read_bytes()).hexdigest() == digest, name
    readme = (vectors_dir / "README.md").read_text()
    assert all(f"`{name}`" in readme and f"`{digest}`" in readme for name, digest in listed.items())
