"""The local feature cache of `cdi audit` and `cdi.run_audit` (cdi.cache.LocalFeatureStore)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cdi.cache import LocalFeatureStore, default_cache_dir


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_rows_come_back_under_their_key_only(tmp_path: Path) -> None:
    store = LocalFeatureStore(tmp_path)
    rows = {_sha(i): np.arange(26, dtype=np.float64) * i for i in range(3)}
    rows[_sha(3)] = np.full(26, np.nan)  # a row of features not computed is kept as it is
    store.save("model-a|layout|0|all", rows)
    got = store.load("model-a|layout|0|all", [*rows, _sha(99)])
    assert set(got) == set(rows)
    for sha, row in rows.items():
        np.testing.assert_array_equal(got[sha], row)
    assert store.load("model-a|layout|1|all", list(rows)) == {}  # another seed: another key
    # Keyed as the service keys its rows: the SHA-256 of the library's key.
    assert (tmp_path / hashlib.sha256(b"model-a|layout|0|all").hexdigest()).is_dir()


def test_hostile_names_and_damaged_rows(tmp_path: Path) -> None:
    store = LocalFeatureStore(tmp_path / "cache")
    store.save("k", {"../../escape": np.zeros(26), _sha(1): np.ones(26)})
    assert not (tmp_path / "escape.npy").exists() and not list(tmp_path.glob("*.npy"))
    assert store.load("k", ["../../escape", _sha(1)]).keys() == {_sha(1)}
    path = next((tmp_path / "cache").rglob(f"{_sha(1)}.npy"))
    path.write_bytes(b"not a numpy file")
    assert store.load("k", [_sha(1)]) == {}  # computed again, then overwritten
    store.save("k", {_sha(1): np.ones(26)})
    assert list(store.load("k", [_sha(1)])) == [_sha(1)]
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDI_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("CDI_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cdi" / "features"
