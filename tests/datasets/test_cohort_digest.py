"""A cohort's identity follows its files' contents; digests are cached on disk by (path, size, mtime)."""

import os

import pytest

from cfcml.datasets import file_digests, write_synthetic
from cfcml.datasets.reader import load_cohort
from cfcml.datasets.spec import load_spec


@pytest.fixture()
def digest_cache(tmp_path, monkeypatch):
    path = tmp_path / "digests.json"
    monkeypatch.setenv("CFCML_DIGEST_CACHE", str(path))
    return path


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_edited_image_of_the_same_size_changes_the_digest(tmp_path, digest_cache):
    root = write_synthetic("men", tmp_path / "men", 9, seed=1)
    spec = load_spec("men")
    before = load_cohort(spec, root).digest()
    case = load_cohort(spec, root).cases[0]
    image = next(p for p in case.images if p is not None)
    size = os.stat(image).st_size
    _flip_a_byte(image)
    assert os.stat(image).st_size == size
    assert load_cohort(spec, root).digest() != before
    assert digest_cache.exists()  # remembered for the next command


def test_a_repeated_command_reads_digests_from_the_cache(tmp_path, digest_cache, monkeypatch):
    root = write_synthetic("men", tmp_path / "men", 9, seed=1)
    spec = load_spec("men")
    first = load_cohort(spec, root).digest()
    monkeypatch.setattr(file_digests, "_memo", {})  # a new process: only the file on disk remains

    def no_reading(path):
        raise AssertionError(f"{path} was re-read although its size and mtime are unchanged")

    monkeypatch.setattr(file_digests, "_hash", no_reading)
    assert load_cohort(spec, root).digest() == first


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, digest_cache):
    root = write_synthetic("men", tmp_path / "men", 9, seed=1)
    digest_cache.write_text("{not json")
    spec = load_spec("men")
    assert load_cohort(spec, root).digest() == load_cohort(spec, root).digest()
    assert digest_cache.read_text().startswith("{")
