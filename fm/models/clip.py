"""CLIP (Radford et al. 2021): a dual encoder that maps images and captions into one embedding space.

One file, one config: `ClipConfig` (frozen; `to_dict`/`from_dict` round-trip a checkpoint's
config.json) and `CLIP`, a single-device nn.Module built from the decoder's pre-norm `Block`s
(RoPE, RMSNorm, SwiGLU, SDPA). The only code here that knows of ranks is `clip_loss`'s optional
feature gather.

    from fm.models.clip import CLIP, ClipConfig, clip_loss, retrieval_metrics
    model = CLIP(ClipConfig())
    img, txt, scale = model(images, ids, lengths)   # images (B, 3, 64, 64) normalised; ids (B, T) right-padded
    loss = clip_loss(img, txt, scale)                # symmetric InfoNCE; gathers across ranks under torchrun
    metrics = retrieval_metrics(img @ txt.T, image_of_text=torch.arange(B))

    classifier = zero_shot_classifier(model, encode_texts, ["cat", "dog"], ["a photo of a {}."])  # (C, E)
    predicted = zero_shot_predict(model.encode_image(images), classifier)                          # (B,)

Towers:
    visual: Conv2d patch embedding (stride = patch) -> [class token; patches] -> bidirectional Blocks
        -> RMSNorm; the class token's state is the image feature. Positions are 2D axial RoPE (below).
    text: token embedding over fm tokenizer ids -> causal Blocks -> RMSNorm; the state at the last
        real token is the caption feature (CLIP reads its end-of-text token), so a caption should end
        with <|endoftext|>. Causal attention means right padding never reaches a real token: no mask.
Both features go through a bias-free projection to embed_dim and are L2-normalised; the logits are
exp(logit_scale) * cosine similarity, the scale learned and clamped at exp(max_logit_scale) = 100.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fm.models.decoder import Block, ModelConfig, rope_tables

# Vision RoPE base. The grid is short (image_size / patch_size + 1 positions per axis), so the
# text base of 10000 would leave most frequencies turning by a hair across the whole image; 100
# (as in RoPE-ViT, Heo et al. 2024) spreads them over the grid.
VISION_ROPE_THETA = 100.0
TEXT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ClipConfig:
    """Architecture of a CLIP. Widths split into heads; the vision head size must be a multiple of 4
    (2D RoPE gives half of each head's rotation pairs to rows, half to columns)."""

    image_size: int = 64  # pixels, square
    patch_size: int = 8  # pixels; (image_size / patch_size)^2 patch tokens
    vision_layers: int = 4
    vision_width: int = 128
    vision_heads: int = 4
    text_layers: int = 4
    text_width: int = 128
    text_heads: int = 4
    vocab_size: int = 8192  # fm tokenizer's
    context_length: int = 32  # maximum caption tokens
    embed_dim: int = 128  # shared embedding space
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP: temperature 0.07
    max_logit_scale: float = math.log(100)  # CLIP clamps exp(logit_scale) at 100
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("image_size", "patch_size", "vision_layers", "vision_width", "vision_heads", "text_layers",
                     "text_width", "text_heads", "vocab_size", "context_length", "embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"clip.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"clip.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_width % self.vision_heads or (self.vision_width // self.vision_heads) % 4:
            raise ValueError(f"clip.vision_width ({self.vision_width}) must split into vision_heads ({self.vision_heads}) "
                             "heads of a size divisible by 4 (2D RoPE)")
        if self.text_width % self.text_heads or (self.text_width // self.text_heads) % 2:
            raise ValueError(f"clip.text_width ({self.text_width}) must split into text_heads ({self.text_heads}) "
                             "heads of even size")
        if self.init_logit_scale > self.max_logit_scale:
            raise ValueError(f"clip.init_logit_scale ({self.init_logit_scale}) exceeds "
                             f"max_logit_scale ({self.max_logit_scale})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"clip.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown clip config keys: {sorted(unknown)}")
        return cls(**d)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def vision_model_config(self) -> ModelConfig:
        """The decoder config the vision Blocks are built from (bidirectional; vocab unused)."""
        return ModelConfig(vocab_size=1, seq_len=1 + self.num_patches, n_layer=self.vision_layers, n_head=self.vision_heads,
                           d_model=self.vision_width, dropout=self.dropout, causal=False)

    def text_model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, seq_len=self.context_length, n_layer=self.text_layers,
                           n_head=self.text_heads, d_model=self.text_width, dropout=self.dropout, causal=True)

    def num_params(self) -> int:
        """Parameter count from the config alone (equals sum of numel over CLIP(cfg).parameters())."""
        vw, tw = self.vision_width, self.text_width
        patches_and_class_token = 3 * self.patch_size ** 2 * vw + vw
        vision = patches_and_class_token + self.vision_model_config().num_params(non_embedding=True)
        text = self.vocab_size * tw + self.text_model_config().num_params(non_embedding=True)
        return vision + text + (vw + tw) * self.embed_dim + 1  # projections, logit_scale


def axial_rope_tables(grid: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE tables (1 + grid^2, head_dim) for apply_rope: [class token; patches in raster order].

    Half of the head_dim/2 rotation pairs turn with the row, half with the column, so attention
    scores depend on the (row, column) offset between patches. (1D RoPE over the raster order would
    alias: the patch one row down and seven columns left sits at the same distance as the next one
    right, on an 8-wide grid.) Patches sit at (1 + row, 1 + col) and the class token at (0, 0), a
    position no patch has.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float64) / (head_dim // 2))  # (D/4,)
    rows = torch.arange(1, grid + 1, dtype=torch.float64).repeat_interleave(grid)  # (N,) 1,1,..,2,2,..
    cols = torch.arange(1, grid + 1, dtype=torch.float64).repeat(grid)  # (N,) 1,2,..,1,2,..
    rows, cols = F.pad(rows, (1, 0)), F.pad(cols, (1, 0))  # (1 + N,) class token at (0, 0)
    angles = torch.cat((torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)), dim=-1)  # (1 + N, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).float(), torch.cat((-sin, sin), dim=-1).float()  # (1 + N, D) each


def _init_blocks(blocks: nn.ModuleList, std: float) -> None:
    """The decoder's GPT-2 init: normal(0, std), residual projections scaled by 1/sqrt(2 n_layer)."""
    out_std = std / math.sqrt(2 * len(blocks))
    for block in blocks:
        block.attn_norm.reset_parameters()
        block.mlp_norm.reset_parameters()
        block.attn.init_weights(std, out_std)
        block.mlp.init_weights(std, out_std)


class VisionTransformer(nn.Module):
    """ViT: patches + class token -> bidirectional Blocks with 2D RoPE -> RMSNorm."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        mcfg = cfg.vision_model_config()
        self.patch_embed = nn.Conv2d(3, cfg.vision_width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.empty(cfg.vision_width))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(mcfg, i) for i in range(cfg.vision_layers))
        self.norm = nn.RMSNorm(cfg.vision_width, eps=mcfg.norm_eps)
        # Derived from the config, so not saved: rebuilt by init_weights (also after a meta-device init).
        self.register_buffer("rope_cos", torch.empty(mcfg.seq_len, mcfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(mcfg.seq_len, mcfg.head_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        cos, sin = axial_rope_tables(cfg.grid_size, cfg.vision_width // cfg.vision_heads, VISION_ROPE_THETA)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        nn.init.normal_(self.class_token, std=cfg.vision_width ** -0.5)  # CLIP's class embedding scale
        _init_blocks(self.layers, 0.02)
        self.norm.reset_parameters()

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All token states after the final norm: images (B, 3, H, W) -> (B, 1 + N, vision_width), class token first."""
        B, _, H, W = images.shape
        if H != self.cfg.image_size or W != self.cfg.image_size:
            raise ValueError(f"images must be {self.cfg.image_size}x{self.cfg.image_size}, got {H}x{W}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C) patches in raster order
        x = torch.cat((self.class_token.to(x.dtype).expand(B, 1, -1), x), dim=1)  # (B, 1 + N, C)
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin)  # (1 + N, D) each
        for block in self.layers:
            x, _ = block(x, rope, None, False)  # (B, 1 + N, C) bidirectional
        return self.norm(x)  # (B, 1 + N, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features: the class token's state (B, vision_width)."""
        return self.tokens(images)[:, 0]  # (B, C)


class TextTransformer(nn.Module):
    """Token embedding -> causal Blocks with RoPE -> RMSNorm; pooled at each caption's last real token."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        mcfg = cfg.text_model_config()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(mcfg, i) for i in range(cfg.text_layers))
        self.norm = nn.RMSNorm(cfg.text_width, eps=mcfg.norm_eps)
        self.register_buffer("rope_cos", torch.empty(mcfg.seq_len, mcfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(mcfg.seq_len, mcfg.head_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        cos, sin = rope_tables(cfg.context_length, cfg.text_width // cfg.text_heads, TEXT_ROPE_THETA)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        _init_blocks(self.layers, 0.02)
        self.norm.reset_parameters()

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Caption features (B, text_width) at the last real token of ids (B, T), T <= context_length.

        ids are right-padded (any pad id: causal attention keeps padding out of real tokens);
        lengths (B,) int64 in [1, T] count each row's real tokens. The pooling is a gather with an
        index tensor, not Python on tensor values, so it exports with dynamic batch and sequence.
        In eager mode an out-of-range length fails in the gather.
        """
        B, T = ids.shape
        if T > self.cfg.context_length:
            raise ValueError(f"{T} tokens exceed context_length={self.cfg.context_length}")
        x = self.drop(self.tok_emb(ids))  # (B, T, C)
        rope = (self.rope_cos[:T], self.rope_sin[:T])  # (T, D) each
        for block in self.layers:
            x, _ = block(x, rope, None, True)  # (B, T, C) causal
        x = self.norm(x)  # (B, T, C)
        last = (lengths.to(torch.long) - 1).view(B, 1, 1).expand(B, 1, x.shape[-1])  # (B, 1, C) index of the last real token
        return x.gather(1, last).squeeze(1)  # (B, C)


class CLIP(nn.Module):
    """Vision and text towers, projections into embed_dim, and the learned logit scale."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))  # log of the inverse temperature
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The towers' own init; projections normal(0, width^-0.5) as in CLIP; logit_scale = init_logit_scale."""
        self.visual.init_weights()
        self.text.init_weights()
        nn.init.normal_(self.image_proj.weight, std=self.cfg.vision_width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=self.cfg.text_width ** -0.5)
        self.logit_scale.fill_(self.cfg.init_logit_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), already normalised -> unit-norm embeddings (B, embed_dim)."""
        return F.normalize(self.image_proj(self.visual(images)), dim=-1)  # (B, E)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) -> unit-norm embeddings (B, embed_dim)."""
        return F.normalize(self.text_proj(self.text(ids, lengths)), dim=-1)  # (B, E)

    def forward(self, images, ids, lengths):
        """(image_features (B, E), text_features (B, E), scale): scale = exp(logit_scale) clamped at
        exp(max_logit_scale), a scalar tensor. Clamping here rather than the parameter after each
        step keeps the optimizer out of it; above the cap the scale gets no gradient and stays put."""
        scale = self.logit_scale.exp().clamp(max=math.exp(self.cfg.max_logit_scale))
        return self.encode_image(images), self.encode_text(ids, lengths), scale


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: (CE(image -> text) + CE(text -> image)) / 2, the i-th image matching the i-th text.

    image_features, text_features (B, E), L2-normalised; logit_scale: the exponentiated scale
    (CLIP.forward's third output). gather (None: whenever torch.distributed is initialised with
    world size > 1): all-gather both feature sets from every rank with gradients and score this
    rank's B rows against all world * B columns, labels offset by rank * B; open_clip's
    ClipLoss(local_loss=True, gather_with_grad=True). Every rank must hold the same B.

    Under DDP: each rank's loss is the mean over its rows, so the mean over ranks is the loss of the
    global batch. The gather's backward sums every rank's gradient into the features it came from,
    so a rank's feature gradient is world_size times the global loss's; DDP's averaging of
    parameter gradients divides that back out, giving the global batch's gradient.
    """
    if gather is None:
        gather = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
    labels = torch.arange(image_features.shape[0], device=image_features.device)  # (B,)
    if gather:
        import torch.distributed.nn.functional as dist_nn  # loads only where distributed is used

        if not torch.distributed.is_initialized():
            raise ValueError("clip_loss(gather=True) needs an initialised torch.distributed process group")
        all_images = torch.cat(dist_nn.all_gather(image_features), dim=0)  # (world * B, E)
        all_texts = torch.cat(dist_nn.all_gather(text_features), dim=0)  # (world * B, E)
        labels = labels + torch.distributed.get_rank() * image_features.shape[0]
    else:
        all_images, all_texts = image_features, text_features
    # In fp32 even under autocast: at a scale near 100, bf16 logits would be rounded to steps of 0.5.
    with torch.autocast(image_features.device.type, enabled=False):
        image_features, text_features = image_features.float(), text_features.float()
        all_images, all_texts, logit_scale = all_images.float(), all_texts.float(), logit_scale.float()
        logits_per_image = logit_scale * image_features @ all_texts.T  # (B, world * B)
        logits_per_text = logit_scale * text_features @ all_images.T  # (B, world * B)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@torch.no_grad()
def retrieval_metrics(similarity: torch.Tensor, image_of_text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways from similarity (N_images, N_texts); image_of_text (N_texts,) is each text's image.

    An image may have several captions (e.g. English and Chinese); each must have at least one.
      image_to_text_R@k: share of images with at least one of their captions among their top-k texts.
      text_to_image_R@k: share of texts whose image is among their top-k images.
    Ties are broken against the model: a wrong item scoring the same as the true one ranks ahead of
    it. The true item's rank is the number of wrong items scoring >= it (for an image, against its
    best caption), a hit at k when that is < k. So a collapsed model (all scores equal) gets no
    credit, and the result does not depend on the order of the items. A k beyond the number of
    candidates acts as clamped to it: every rank is below it (the key keeps the k asked for).
    Values are Python floats.
    """
    sim = similarity.float()  # (N_i, N_t)
    n_images, n_texts = sim.shape
    image_of_text = image_of_text.to(device=sim.device, dtype=torch.long)
    if image_of_text.shape != (n_texts,):
        raise ValueError(f"image_of_text must have shape ({n_texts},), got {tuple(image_of_text.shape)}")
    if n_texts and not 0 <= int(image_of_text.min()) <= int(image_of_text.max()) < n_images:
        raise ValueError(f"image_of_text must index the {n_images} images")
    match = image_of_text[None, :] == torch.arange(n_images, device=sim.device)[:, None]  # (N_i, N_t) a caption of the image
    if not bool(match.any(dim=1).all()):
        raise ValueError("every image needs at least one text")
    true_score = sim[image_of_text, torch.arange(n_texts, device=sim.device)]  # (N_t,) each text with its image
    t2i_rank = ((sim >= true_score[None, :]) & ~match).sum(dim=0)  # (N_t,) wrong images at or above the true one
    best_caption = sim.masked_fill(~match, float("-inf")).amax(dim=1)  # (N_i,) each image's best-scoring caption
    i2t_rank = ((sim >= best_caption[:, None]) & ~match).sum(dim=1)  # (N_i,) wrong texts at or above it
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item()
    return out


@torch.no_grad()
def zero_shot_classifier(model: CLIP, encode_texts: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
                         classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Class embeddings (C, embed_dim) by CLIP's prompt ensembling: for each class, embed every template
    filled with its name ("a photo of a {}."), average the unit-norm embeddings, re-normalise.

    encode_texts(list of strings) -> (ids (n, T), lengths (n,)), e.g. from the fm tokenizer. The model
    runs in whatever mode it is in: call model.eval() first if it has dropout.
    """
    if any("{}" not in t for t in templates):
        raise ValueError("every template needs a '{}' for the class name")
    device = model.logit_scale.device
    weights = []
    for name in classnames:
        ids, lengths = encode_texts([t.format(name) for t in templates])
        emb = model.encode_text(ids.to(device), lengths.to(device))  # (n_templates, E), unit norm
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))  # (E,)
    return torch.stack(weights)  # (C, E)


def zero_shot_predict(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class index (N,) of each image feature (N, E): the argmax of cosine similarity with classifier (C, E)."""
    return (F.normalize(image_features, dim=-1) @ F.normalize(classifier, dim=-1).T).argmax(dim=-1)  # (N,)
