"""Tabular attributes as text: the frozen CLIP text tower, its sentence-embedding cache, and
the paper's MLP alternative (Fig. 9).

The text encoder is frozen and deterministic, so each distinct sentence is encoded once per
(architecture, weights digest) and kept on disk; the training step only looks embeddings up. The
encoder is never a submodule of the CFCML model, so its weights never reach a checkpoint.
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..util.file_hash import file_sha256

CLIP_MODEL = "ViT-B-32"
CLIP_TEXT_DIM = 512
DEFAULT_TAG = "openai"  # what a bare weights path is taken to be
RANDOM_INIT = "none"
RANDOM_DIGEST = "random-init-seed0"
# The parts of a full CLIP state dict that make up the text tower (open_clip names).
_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class TextEncoderUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class TextWeights:
    """What `model.text_pretrained` names: an open_clip pretrained tag, which decides the
    architecture (OpenAI's weights need QuickGELU, LAION's ViT-B-32 weights GELU), and
    optionally a local file holding that tag's weights (None: the tag's hub file)."""

    tag: str | None  # None: random init
    file: Path | None = None

    @property
    def quick_gelu(self) -> bool:
        import open_clip  # open_clip takes seconds to import: every use here imports it on demand

        return self.tag is not None and bool(
            open_clip.get_pretrained_cfg(CLIP_MODEL, self.tag).get("quick_gelu", False)
        )

    @property
    def architecture(self) -> str:
        """open_clip's model name for this activation: ViT-B-32 or ViT-B-32-quickgelu."""
        return f"{CLIP_MODEL}-quickgelu" if self.quick_gelu else CLIP_MODEL


def _known_tags() -> list[str]:
    import open_clip

    return open_clip.list_pretrained_tags_by_model(CLIP_MODEL)


def _clean_tag(tag: str) -> str | None:
    """open_clip's spelling of `tag` if it is a ViT-B-32 pretrained tag, else None."""
    clean = tag.strip().lower().replace("-", "_")
    return clean if clean in _known_tags() else None


def parse_text_pretrained(spec: str) -> TextWeights:
    """'none' | '<tag>' | '<tag>:/path/to/file' | '/path/to/file' (taken as the openai tag).

    A file is declared with the tag of the weights it holds because the tag decides the
    activation; nothing in a state dict says which one its weights were trained with.
    """
    spec = str(spec).strip()
    if spec == RANDOM_INIT:
        return TextWeights(None)
    tag = _clean_tag(spec)
    if tag is not None and not Path(spec).expanduser().exists():
        return TextWeights(tag)
    if ":" in spec and not Path(spec).expanduser().exists():
        prefix, rest = spec.split(":", 1)
        tag = _clean_tag(prefix)
        if tag is not None:
            return TextWeights(tag, Path(rest).expanduser())
        if "/" not in prefix and "\\" not in prefix:
            raise TextEncoderUnavailable(
                f"model.text_pretrained={spec!r}: {prefix!r} is not an open_clip pretrained tag for {CLIP_MODEL} "
                f"({', '.join(_known_tags())})"
            )
    return TextWeights(DEFAULT_TAG, Path(spec).expanduser())


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(pretrained: str) -> tuple[TextWeights, Path | None]:
    """The parsed choice and the local file to load (None: random init). Fails in seconds when
    the weights are neither local nor cached and the hub cannot be reached."""
    weights = parse_text_pretrained(pretrained)
    if weights.tag is None:
        return weights, None
    if weights.file is not None:
        if not weights.file.is_file():
            raise TextEncoderUnavailable(
                f"model.text_pretrained={pretrained!r} is neither an existing file nor an open_clip tag for "
                f"{CLIP_MODEL} ({', '.join(_known_tags())}); a local file is given as TAG:/path, e.g. "
                "openai:/path/to/open_clip_model.safetensors"
            )
        return weights, weights.file
    import open_clip

    cfg = open_clip.get_pretrained_cfg(CLIP_MODEL, weights.tag)
    cached = _cached_hub_file(cfg)
    if cached is not None:
        return weights, cached
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise TextEncoderUnavailable(
            f"the {CLIP_MODEL} '{weights.tag}' text-encoder weights are not cached and the model hub cannot be "
            "reached. Download open_clip_pytorch_model.bin (or the .safetensors file) for "
            f"{cfg.get('hf_hub', CLIP_MODEL)} on a machine with internet access and pass its path with its tag: "
            f"--set model.text_pretrained={weights.tag}:/path/to/open_clip_model.safetensors "
            "(or --set model.text_pretrained=none for a random, untrained text encoder)"
        )
    return weights, Path(open_clip.download_pretrained(cfg))


def _cached_hub_file(cfg: dict) -> Path | None:
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache  # comes with open_clip: imported on demand like it

    repo_id, filename = os.path.split(hub)
    for name in ([filename] if filename else []) + ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return Path(found)
    return None


def _text_tower_state(state: dict) -> dict:
    """The text-tower entries of a CLIP state dict (open_clip CLIP layout, or CustomTextCLIP's
    `text.` prefix)."""
    if any(k.startswith("text.") for k in state):
        state = {k[len("text.") :]: v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if k.startswith(_TEXT_PREFIXES)}


class ClipTextEncoder:
    """The open_clip ViT-B-32 text tower, frozen, in eval mode. Not an nn.Module on purpose:
    it must never be registered inside the trainable model.

    `pretrained`: 'none' (random init, seed 0), an open_clip tag ('openai', 'laion2b_s34b_b79k',
    ...) or a local file declared with its tag ('openai:/path/to/file'; a bare path is taken as
    openai). The tag decides the activation exactly as open_clip's pretrained config does.
    """

    def __init__(self, pretrained: str = DEFAULT_TAG, device: str | torch.device = "cpu"):
        import open_clip
        from open_clip.factory import load_state_dict
        from open_clip.model import _build_text_tower

        weights, path = resolve_weights(pretrained)
        cfg = open_clip.get_model_config(CLIP_MODEL)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # 'none' gives the same random tower everywhere
            self.tower = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=weights.quick_gelu)
        if path is not None:
            text_state = _text_tower_state(load_state_dict(str(path)))
            missing, _ = self.tower.load_state_dict(text_state, strict=False)
            if missing:
                raise TextEncoderUnavailable(f"{path} lacks text-tower weights: {missing[:5]}...")
            self.digest = file_sha256(path)[:16]
        else:
            self.digest = RANDOM_DIGEST
        self.tower.requires_grad_(False).eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
        self.device = torch.device(device)
        self.weights = weights
        self.name = f"clip-{weights.architecture}"
        self.dim = CLIP_TEXT_DIM

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.tower.parameters())

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 256) -> torch.Tensor:
        """[n] sentences -> [n, 512] projected EOT embeddings (float32, CPU)."""
        out = []
        for i in range(0, len(sentences), batch_size):
            tokens = self.tokenizer(sentences[i : i + batch_size]).to(self.device)
            out.append(self.tower(tokens).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)


class SentenceEmbeddingCache:
    """Sentence -> embedding, computed once per (encoder, weights digest) and kept on disk.

    `encoder_factory` is only called when a sentence is missing, so a warm cache never even
    builds the 63 M-parameter text tower. `encoded_count` counts sentences actually encoded.
    """

    def __init__(self, cache_dir: str | Path, encoder_name: str, digest: str, encoder_factory):
        self.path = Path(cache_dir) / "text-embeddings" / f"{encoder_name}-{digest}.pt"
        self._factory = encoder_factory
        self._encoder = None
        self._table: dict[str, torch.Tensor] = torch.load(self.path) if self.path.exists() else {}
        self.encoded_count = 0

    def embed(self, sentences: list[str]) -> torch.Tensor:
        """[n] sentences -> [n, dim] float32; encodes and saves only the unseen ones."""
        missing = sorted(set(sentences) - self._table.keys())
        if missing:
            if self._encoder is None:
                self._encoder = self._factory()
            for s, e in zip(missing, self._encoder.encode(missing)):
                self._table[s] = e.clone()
            self.encoded_count += len(missing)
            self._save()
        return torch.stack([self._table[s] for s in sentences])

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(self._table, tmp)
        os.replace(tmp, self.path)  # atomic: concurrent trials never read half a file


@functools.cache
def weights_digest(pretrained: str) -> str:
    """The weights part of the cache key (16 hex digits of the file's SHA-256, or the random
    init's name), without building the encoder."""
    _, path = resolve_weights(pretrained)
    return RANDOM_DIGEST if path is None else file_sha256(path)[:16]


def encoder_name(pretrained: str) -> str:
    """The architecture part of the cache key: clip-ViT-B-32 (GELU) or clip-ViT-B-32-quickgelu.
    The same file under another activation gives other embeddings, so another cache."""
    return f"clip-{parse_text_pretrained(pretrained).architecture}"


@functools.cache
def sentence_cache(cache_dir: str | Path, pretrained: str, device="cpu") -> SentenceEmbeddingCache:
    """One cache per (folder, architecture, weights) in a process: folds, seeds and trials share it."""
    return SentenceEmbeddingCache(
        cache_dir, encoder_name(pretrained), weights_digest(pretrained), lambda: ClipTextEncoder(pretrained, device)
    )


class TabularTextProjection(nn.Module):
    """Sentence embeddings [B, t, 512] -> [B, t, C_t] (Linear + ReLU), the trainable part."""

    def __init__(self, in_dim: int = CLIP_TEXT_DIM, dim: int = 128):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(emb))


class MLPTabularEmbedding(nn.Module):
    """The Fig. 9 alternative: encoded attributes [B, F] -> t tokens [B, t, C_t] by an MLP."""

    def __init__(self, num_features: int, num_tokens: int, dim: int = 128, hidden: int = 256):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.mlp = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_tokens * dim), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).view(x.shape[0], self.num_tokens, self.dim)
