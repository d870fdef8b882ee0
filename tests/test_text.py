import time

import pytest
import torch

from cfcml.models.text import (
    ClipTextEncoder,
    SentenceEmbeddingCache,
    TextEncoderUnavailable,
    sentence_cache,
    weights_digest,
)

SENTENCES = ["The sex of patient is male", "The sex of patient is female", "The age of patient is 54"]


class CountingEncoder:
    """Wraps the real (random-init) CLIP text tower and counts the sentences it encodes."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def encode(self, sentences):
        self.seen.extend(sentences)
        return self.inner.encode(sentences)


@pytest.fixture(scope="module")
def tower():
    return ClipTextEncoder("none")


def test_each_distinct_sentence_is_encoded_once_and_kept_on_disk(tmp_path, tower):
    enc = CountingEncoder(tower)
    cache = SentenceEmbeddingCache(tmp_path, "clip", "d1", lambda: enc)
    first = cache.embed(SENTENCES + SENTENCES[:1])
    assert first.shape == (4, 512)
    assert sorted(enc.seen) == sorted(SENTENCES)
    assert torch.equal(first[0], first[3])
    cache.embed(SENTENCES)  # a second epoch encodes nothing
    assert len(enc.seen) == 3

    built = []
    reopened = SentenceEmbeddingCache(tmp_path, "clip", "d1", lambda: built.append(1))
    assert torch.equal(reopened.embed(SENTENCES), first[:3])
    assert built == [] and reopened.encoded_count == 0  # a warm cache never builds the encoder
    other = SentenceEmbeddingCache(tmp_path, "clip", "d2", lambda: CountingEncoder(tower))
    other.embed(SENTENCES[:1])
    assert other.encoded_count == 1  # a different weights digest is a different cache


def test_random_init_tower_is_deterministic_and_frozen(tower):
    again = ClipTextEncoder("none")
    assert torch.equal(tower.encode(SENTENCES), again.encode(SENTENCES))
    assert not any(p.requires_grad for p in tower.tower.parameters())
    assert 60e6 < tower.num_params < 66e6


def test_local_checkpoint_path_is_loaded(tmp_path, tower):
    ckpt = tmp_path / "text.pt"
    state = {k: v * 0 + 0.01 if k == "ln_final.bias" else v for k, v in tower.tower.state_dict().items()}
    torch.save(state, ckpt)
    loaded = ClipTextEncoder(str(ckpt))
    assert torch.equal(loaded.tower.ln_final.bias, torch.full_like(loaded.tower.ln_final.bias, 0.01))
    assert loaded.digest == weights_digest(str(ckpt)) != "random-init-seed0"


def test_hub_weights_offline_fail_fast_with_a_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    weights_digest.cache_clear()
    start = time.time()
    with pytest.raises(TextEncoderUnavailable, match="model.text_pretrained=/path/to"):
        ClipTextEncoder("openai")
    assert time.time() - start < 5


def test_unknown_tag_is_a_clear_error():
    with pytest.raises(TextEncoderUnavailable, match="neither an existing file nor an open_clip tag"):
        weights_digest("no-such-weights")


def test_sentence_cache_is_shared_within_a_process(tmp_path):
    assert sentence_cache(str(tmp_path), "none") is sentence_cache(str(tmp_path), "none")
