import time

import pytest
import torch

from cfcml.models.text import (
    ClipTextEncoder,
    SentenceEmbeddingCache,
    TextEncoderUnavailable,
    TextWeights,
    encoder_name,
    parse_text_pretrained,
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
    with pytest.raises(TextEncoderUnavailable, match="model.text_pretrained=openai:/path/to"):
        ClipTextEncoder("openai")
    assert time.time() - start < 5


def test_unknown_tag_is_a_clear_error():
    with pytest.raises(TextEncoderUnavailable, match="neither an existing file nor an open_clip tag"):
        weights_digest("no-such-weights")


def test_sentence_cache_is_shared_within_a_process(tmp_path):
    assert sentence_cache(str(tmp_path), "none") is sentence_cache(str(tmp_path), "none")


# ---------------------------------------------------------------------------------------------
# The tag decides the architecture (QuickGELU for OpenAI's weights), as in open_clip


@pytest.fixture(scope="module")
def open_clip_openai_arch(tmp_path_factory):
    """open_clip's own ViT-B-32 with the OpenAI architecture (QuickGELU), random init, saved as
    a full CLIP checkpoint: the stand-in for OpenAI's weights file."""
    import open_clip

    torch.manual_seed(11)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_openai_tagged_file_gives_open_clips_own_sentence_embeddings(open_clip_openai_arch):
    import open_clip

    model, path = open_clip_openai_arch
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(SENTENCES))
    ours = ClipTextEncoder(f"openai:{path}")
    assert ours.name == "clip-ViT-B-32-quickgelu"
    torch.testing.assert_close(ours.encode(SENTENCES), expected, rtol=1e-5, atol=1e-5)
    # The same weights under a LAION tag run GELU: other embeddings (the activation matters).
    laion = ClipTextEncoder(f"laion2b_s34b_b79k:{path}")
    assert laion.name == "clip-ViT-B-32"
    assert (laion.encode(SENTENCES) - expected).abs().max() > 1e-2


def test_parse_text_pretrained(tmp_path):
    f = tmp_path / "w.safetensors"
    assert parse_text_pretrained("none") == TextWeights(None)
    assert parse_text_pretrained("openai") == TextWeights("openai")
    assert parse_text_pretrained("LAION2B-S34B-B79K") == TextWeights("laion2b_s34b_b79k")  # open_clip's spelling
    assert parse_text_pretrained(f"openai:{f}") == TextWeights("openai", f)
    assert parse_text_pretrained(str(f)) == TextWeights("openai", f)
    assert parse_text_pretrained(f"laion400m_e31:{f}") == TextWeights("laion400m_e31", f)
    # open_clip's pretrained config decides: OpenAI and laion400m weights were trained with QuickGELU
    assert [parse_text_pretrained(t).quick_gelu for t in ("none", "openai", "laion400m_e31", "laion2b_s34b_b79k")] == [
        False,
        True,
        True,
        False,
    ]
    with pytest.raises(TextEncoderUnavailable, match="'bogus' is not an open_clip pretrained tag"):
        parse_text_pretrained(f"bogus:{f}")


def test_cache_key_holds_the_architecture(tmp_path, open_clip_openai_arch):
    _, path = open_clip_openai_arch
    as_openai = sentence_cache(str(tmp_path), f"openai:{path}")
    as_laion = sentence_cache(str(tmp_path), f"laion2b_s34b_b79k:{path}")
    assert as_openai.path != as_laion.path  # same file, other activation: other embeddings
    assert as_openai.path.name == f"clip-ViT-B-32-quickgelu-{weights_digest(str(path))}.pt"
    assert sentence_cache(str(tmp_path), str(path)).path == as_openai.path
    # random init keeps its key (existing caches stay valid)
    assert sentence_cache(str(tmp_path), "none").path.name == "clip-ViT-B-32-random-init-seed0.pt"
    assert encoder_name("none") == "clip-ViT-B-32"


def test_missing_tagged_file_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderUnavailable, match="neither an existing file"):
        ClipTextEncoder(f"openai:{tmp_path / 'missing.pt'}")
