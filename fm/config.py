"""Settings: one frozen dataclass per params.yaml section, loaded with `load_params`.

params.yaml is the single source of every setting. `--set section.key=value` overrides are
applied on top (values parsed as YAML, so `--set curate.jaccard_threshold=0.7` is a float).
Unknown sections or keys and out-of-range values raise ValueError naming the file and key.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def _positive(cfg, *names: str) -> None:
    section = type(cfg).__name__.removesuffix("Config").lower()
    for name in names:
        value = getattr(cfg, name)
        if value <= 0:
            raise ValueError(f"{section}.{name} must be positive, got {value}")


@dataclass(frozen=True)
class IngestConfig:
    max_text_bytes: int = 2_000_000  # a longer document is quarantined, not truncated
    max_line_bytes: int = 0  # a longer jsonl/tsv line is quarantined unread; 0: 3 * max_text_bytes + 1 MiB
    image_size: int = 64  # images are fit into image_size x image_size and padded to square
    max_image_file_bytes: int = 10_000_000
    max_image_pixels: int = 50_000_000  # decompression-bomb guard, checked before decoding
    min_image_side: int = 8
    detect_lang: bool = True  # detect `lang` where the record does not give it
    code_extensions: dict = field(
        default_factory=lambda: {
            ".py": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp",
            ".js": "javascript", ".ts": "typescript", ".java": "java", ".go": "go", ".rs": "rust",
            ".rb": "ruby", ".sh": "shell", ".sql": "sql", ".html": "html", ".css": "css",
            ".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".md": "markdown",
        }
    )

    def __post_init__(self):
        if self.max_line_bytes == 0:  # room for any record that could pass (\u escapes can triple non-ASCII text)
            object.__setattr__(self, "max_line_bytes", 3 * self.max_text_bytes + (1 << 20))  # and its other fields
        _positive(self, "max_text_bytes", "image_size", "max_image_file_bytes", "max_image_pixels", "min_image_side",
                  "max_line_bytes")


@dataclass(frozen=True)
class ValidateConfig:
    min_pass_rate: float = 0.9  # the stage fails when a modality's pass rate drops below this
    allowed_langs: tuple = ("en", "zh")  # for text, captions and triples; code has its own languages
    min_text_chars: int = 1
    max_text_chars: int = 1_000_000
    max_caption_chars: int = 1_000
    max_triple_field_chars: int = 500
    min_image_side: int = 8
    max_image_side: int = 1024

    def __post_init__(self):
        if not 0.0 <= self.min_pass_rate <= 1.0:
            raise ValueError(f"validate.min_pass_rate must be in [0, 1], got {self.min_pass_rate}")
        object.__setattr__(self, "allowed_langs", tuple(self.allowed_langs))
        _positive(self, "max_text_chars", "max_caption_chars", "max_triple_field_chars", "max_image_side")


@dataclass(frozen=True)
class CurateConfig:
    near_dup: bool = True
    num_perm: int = 128  # MinHash permutations
    num_bands: int = 16  # LSH bands; rows per band = num_perm / num_bands
    shingle_size: int = 5  # word n-grams (character n-grams for text without spaces, e.g. Chinese)
    jaccard_threshold: float = 0.8  # a candidate pair is a near-duplicate at or above this
    min_chars: int = 16  # quality filter: shorter text is removed (captions and triples exempt)
    max_non_alnum_ratio: float = 0.5  # quality filter: share of characters that are neither letters, digits nor space
    seed: int = 0

    def __post_init__(self):
        _positive(self, "num_perm", "num_bands", "shingle_size")
        if self.num_perm % self.num_bands:
            raise ValueError(f"curate.num_perm ({self.num_perm}) must be divisible by curate.num_bands ({self.num_bands})")
        if not 0.0 < self.jaccard_threshold <= 1.0:
            raise ValueError(f"curate.jaccard_threshold must be in (0, 1], got {self.jaccard_threshold}")


@dataclass(frozen=True)
class TokenizeConfig:
    vocab_size: int = 8192
    min_frequency: int = 2
    max_train_bytes: int = 50_000_000  # cap on text fed to the BPE trainer

    def __post_init__(self):
        _positive(self, "vocab_size", "min_frequency", "max_train_bytes")


@dataclass(frozen=True)
class ShardConfig:
    tokens_per_shard: int = 4_000_000  # a token shard holds at most this many tokens
    docs_per_arrow_shard: int = 10_000  # rows per Arrow document / image shard
    triples_per_document: int = 16  # facts about one subject per pretraining paragraph
    seed: int = 0  # document order within each modality

    def __post_init__(self):
        _positive(self, "tokens_per_shard", "docs_per_arrow_shard", "triples_per_document")


@dataclass(frozen=True)
class PretrainConfig:
    preset: str = "small"  # a fm.models.decoder.PRESETS name; `model` overrides its fields
    # overrides of the preset's fields, e.g. {n_layer: 4, moe_layers: every_2}; vocab_size comes from the tokenizer
    model: dict = field(default_factory=lambda: {"n_layer": 4, "d_model": 256, "n_head": 4})
    seq_len: int = 256
    batch_size: int = 8  # sequences per process per micro-batch
    grad_accum: int = 1
    max_steps: int = 200
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto: bf16 on a GPU that has it, else fp32 (bf16 on this CPU runs at half fp32 speed)
    # sampling weight per modality; empty: equal weights
    mix: dict = field(default_factory=lambda: {"text": 0.45, "code": 0.3, "triples": 0.2, "image_text": 0.05})
    val_fraction: float = 0.02  # share of each modality's windows held out for validation
    eval_every: int = 25
    eval_batches: int = 8
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10  # a text line every log_every steps when there is no live progress bar
    seed: int = 0
    nproc: int = 1  # > 1: the stage launches torchrun --nproc_per_node nproc
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard): how the data-parallel dimension is wrapped
    # 3D layout: nproc = dp * pp * tp; dp = nproc // (pp * tp) is derived, and only dp splits the batch
    tp: int = 1  # tensor-parallel degree: attention heads and MLP columns split over tp ranks
    pp: int = 1  # pipeline stages: layer ranges on pp ranks (needs model.tie_embeddings=false)
    pp_microbatches: int = 2  # pp > 1: microbatches per batch_size (which they must divide)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b
    cpu_offload: bool = False  # FSDP2: parameters, gradients and optimizer state live on the CPU
    activation_checkpointing: bool = False
    compile: bool = False
    threads: int = 0  # torch CPU threads per process; 0: torch's default
    peak_tflops: float = 0.0  # MFU denominator per device; 0: measure the matmul peak at start

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size", "grad_accum", "max_steps", "lr", "eval_batches", "keep_checkpoints", "nproc")
        # 0 used to mean "never": a run that cannot resume after a crash, or one that trains blind. The last
        # step is always checkpointed and evaluated, so a value >= max_steps means "only at the end".
        if self.ckpt_every <= 0:
            raise ValueError(f"pretrain.ckpt_every must be positive, got {self.ckpt_every}: a run without checkpoints "
                             f"cannot resume (to save only at the end, set it to max_steps or more)")
        if self.eval_every <= 0:
            raise ValueError(f"pretrain.eval_every must be positive, got {self.eval_every} (to evaluate only at the end, "
                             f"set it to max_steps or more; for no validation at all, set val_fraction: 0)")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"pretrain.dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"pretrain.parallel must be ddp or fsdp, got {self.parallel!r}")
        _positive(self, "tp", "pp", "pp_microbatches")
        if self.nproc % (self.tp * self.pp):
            raise ValueError(f"pretrain.nproc ({self.nproc}) must be dp * tp * pp: a multiple of "
                             f"tp * pp = {self.tp} * {self.pp} = {self.tp * self.pp}")
        if self.nproc > self.tp * self.pp and (self.tp > 1 or self.pp > 1) and self.parallel == "ddp":
            raise ValueError("pretrain.tp > 1 or pp > 1 with dp > 1 needs pretrain.parallel=fsdp "
                             "(FSDP2 wraps the data-parallel dimension of a 2D/3D layout)")
        if self.pp_schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"pretrain.pp_schedule must be gpipe or 1f1b, got {self.pp_schedule!r}")
        if self.pp > 1 and self.batch_size % self.pp_microbatches:
            raise ValueError(f"pretrain.pp_microbatches ({self.pp_microbatches}) must divide batch_size ({self.batch_size})")
        # warmup_steps >= max_steps is allowed (a short `dvc exp run -S pretrain.max_steps=10`): the
        # schedule shortens the warmup and the summary records the one it used.
        if self.log_every < 0:  # 0: no progress lines (benchmarks)
            raise ValueError(f"pretrain.log_every must be >= 0, got {self.log_every}")
        if self.warmup_steps < 0:
            raise ValueError(f"pretrain.warmup_steps must be >= 0, got {self.warmup_steps}")
        if any(w < 0 for w in self.mix.values()):
            raise ValueError(f"pretrain.mix weights must be >= 0, got {self.mix}")


@dataclass(frozen=True)
class PretrainClipConfig:
    # fm.models.clip.ClipConfig fields (vocab_size comes from the tokenizer, image_size from ingest.image_size)
    model: dict = field(default_factory=lambda: {"patch_size": 8, "vision_layers": 4, "vision_width": 128, "vision_heads": 4,
                                                 "text_layers": 4, "text_width": 128, "text_heads": 4,
                                                 "context_length": 32, "embed_dim": 128})
    heldout_fraction: float = 0.25  # share of images (never captions) held out for retrieval and zero-shot
    augment: int = 8  # random-crop padding in pixels (0: none)
    batch_size: int = 64  # images per process per micro-batch; the contrastive loss sees the global batch
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.5  # strong: 900 training images overfit quickly
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    dtype: str = "auto"
    eval_every: int = 100
    eval_batches: int = 2
    ckpt_every: int = 100
    keep_checkpoints: int = 1
    log_every: int = 25
    seed: int = 0
    nproc: int = 1
    parallel: str = "ddp"
    threads: int = 0

    def __post_init__(self):
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"pretrain_clip.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.augment < 0:
            raise ValueError(f"pretrain_clip.augment must be >= 0, got {self.augment}")
        if self.grad_accum != 1:
            raise ValueError("pretrain_clip.grad_accum must be 1: a contrastive loss over micro-batches is not the loss "
                             "over their union (raise batch_size or nproc instead)")
        _positive(self, "batch_size", "max_steps", "lr", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "nproc")
        if self.parallel != "ddp":
            raise ValueError(f"pretrain_clip.parallel must be ddp (the encoders are small), got {self.parallel!r}")
        _training_checks_basic("pretrain_clip", self)


def _training_checks_basic(section: str, cfg) -> None:
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{section}.dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    for key in ("warmup_steps", "log_every"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{section}.{key} must be >= 0, got {getattr(cfg, key)}")


@dataclass(frozen=True)
class CaptionConfig:
    n_prefix: int = 4  # image embeddings in front of the caption (Frozen used 2)
    max_caption_tokens: int = 32
    augment: int = 4  # random-crop padding in pixels
    retrieval_images: int = 100  # held-out images for image -> caption retrieval by likelihood (N x N scores)
    batch_size: int = 32
    max_steps: int = 150
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 2
    ckpt_every: int = 50
    keep_checkpoints: int = 1
    log_every: int = 25
    seed: int = 0
    nproc: int = 1
    threads: int = 0

    def __post_init__(self):
        _positive(self, "n_prefix", "max_caption_tokens", "batch_size", "max_steps", "lr", "eval_every", "eval_batches",
                  "ckpt_every", "keep_checkpoints", "nproc")
        for key in ("augment", "retrieval_images", "warmup_steps", "log_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"caption.{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class InstructionsConfig:
    heldout_fraction: float = 0.1  # share of facts (never templates) held out for evaluation
    n_options: int = 4  # multiple-choice options per item (chance 1 / n_options)
    # Share of the held-out triple facts (hypernym, capital, currency, language) that pretraining never sees
    # either: the shard stage leaves their triples out, so the evaluate stage can set facts pretraining saw
    # only as triples against matched facts no stage saw (knowledge injection). 0: pretraining sees every triple.
    knowledge_probe: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"instructions.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.knowledge_probe <= 1.0:
            raise ValueError(f"instructions.knowledge_probe must be in [0, 1], got {self.knowledge_probe}")
        if self.n_options < 2:
            raise ValueError(f"instructions.n_options must be at least 2, got {self.n_options}")


# Each tuning method's own settings (and learning rate); a params.yaml entry may give some keys, the rest default.
SFT_METHODS = {
    "full": {"lr": 3e-4},
    "lora": {"lr": 5e-3, "rank": 8, "alpha": 16.0, "dropout": 0.05,
             "targets": ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]},
    "prefix": {"lr": 5e-2, "n_prefix": 16},
    "prompt": {"lr": 1e-1, "n_virtual": 16},
}


def _method_settings(section: str, name: str, given: dict) -> dict:
    unknown = sorted(set(given) - set(SFT_METHODS[name]))
    if unknown:
        raise ValueError(f"{section}.{name}: unknown key(s) {', '.join(unknown)} (known: {', '.join(SFT_METHODS[name])})")
    merged = {**SFT_METHODS[name], **given}
    if not merged["lr"] > 0:
        raise ValueError(f"{section}.{name}.lr must be positive, got {merged['lr']}")
    return merged


@dataclass(frozen=True)
class SftConfig:
    methods: tuple = ("lora", "full", "prefix", "prompt")  # each tunes the pretrained model into 06_models/sft/models/<method>
    teacher: str = "lora"  # the tuned model that distill and export take: full or lora (merged)
    full: dict = field(default_factory=lambda: dict(SFT_METHODS["full"]))
    lora: dict = field(default_factory=lambda: dict(SFT_METHODS["lora"]))
    prefix: dict = field(default_factory=lambda: dict(SFT_METHODS["prefix"]))
    prompt: dict = field(default_factory=lambda: dict(SFT_METHODS["prompt"]))
    seq_len: int = 0  # packed rows of whole examples; 0: the pretrained model's seq_len (the most it takes)
    batch_size: int = 8  # rows per process per micro-batch
    grad_accum: int = 1
    max_steps: int = 60
    min_lr_ratio: float = 0.1
    warmup_steps: int = 6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"
    eval_every: int = 30  # held-out instruction loss
    eval_batches: int = 4
    ckpt_every: int = 30
    keep_checkpoints: int = 1
    log_every: int = 10
    mc_items: int = 500  # held-out multiple-choice items scored per model (0: all)
    seed: int = 0
    nproc: int = 1  # > 1: torchrun --nproc_per_node nproc (data parallel)
    parallel: str = "ddp"  # ddp | fsdp
    threads: int = 0

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = [m for m in self.methods if m not in SFT_METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"sft.methods must be distinct names among {', '.join(SFT_METHODS)}, got {list(self.methods)}")
        if self.teacher not in ("full", "lora") or self.teacher not in self.methods:
            raise ValueError(f"sft.teacher must be full or lora and listed in sft.methods, got {self.teacher!r}")
        for name in SFT_METHODS:
            object.__setattr__(self, name, _method_settings("sft", name, getattr(self, name)))
        _positive(self, "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "ckpt_every",
                  "keep_checkpoints", "nproc")
        _training_checks("sft", self)


@dataclass(frozen=True)
class DistillConfig:
    # the student: the teacher's config with these fields replaced (fewer layers, narrower); a layer whose
    # shapes match the teacher's starts from an evenly spaced teacher layer, the embedding and final norm too
    student: dict = field(default_factory=lambda: {"n_layer": 2})
    temperature: float = 2.0
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy
    text_share: float = 0.25  # share of steps on pretraining text (the rest: the instruction set)
    seq_len: int = 0  # 0: the teacher's seq_len
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 80
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 8
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"
    eval_every: int = 40
    eval_batches: int = 4
    ckpt_every: int = 40
    keep_checkpoints: int = 1
    log_every: int = 10
    mc_items: int = 500
    seed: int = 0
    nproc: int = 1
    parallel: str = "ddp"
    threads: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"distill.temperature must be positive, got {self.temperature}")
        for key in ("alpha", "text_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"distill.{key} must be in [0, 1], got {getattr(self, key)}")
        _positive(self, "batch_size", "grad_accum", "max_steps", "lr", "eval_every", "eval_batches",
                  "ckpt_every", "keep_checkpoints", "nproc")
        _training_checks("distill", self)


# Structured pruning of the student's MLP channels (fm/export/prune.py); measured on the default student:
# keep 0.5 + 50 recovery steps costs 0.4% held-out perplexity and buys 11-14% batch-1 speed (bench/prune_bench.py).
PRUNE_DEFAULTS = {
    "enabled": False,
    "keep_fraction": 0.5,  # share of each layer's MLP channels kept, by importance
    "multiple_of": 16,  # kept width rounded to a multiple of this (kernel-friendly)
    "calibration_windows": 16,  # training windows the importance is measured on
    "recovery_steps": 50,  # KD fine-tune towards the unpruned student afterwards (0: none)
    "batch_size": 4,
    "lr": 1e-4,
}


@dataclass(frozen=True)
class ExportConfig:
    windows: int = 16  # held-out pretraining windows the gates are measured on
    window_len: int = 128
    max_logit_diff: float = 1e-3  # gate: fp32 ONNX vs torch, max abs logit difference
    min_int8_agreement: float = 0.9  # gate: int8 vs fp32 top-1 next-token agreement
    prompts: int = 4  # gate: cached ONNX decode vs full-recompute torch greedy tokens, on this many prompts
    generate_tokens: int = 16
    int8: str = "auto"  # auto: build dynamic and static int8, keep the one that agrees more with fp32; or one of them
    calibration_windows: int = 8  # held-out windows (apart from the gate windows) that calibrate static int8
    teacher: bool = True  # export the tuned teacher (sft.teacher) too, under 07_export/teacher/
    clip: bool = True  # export the CLIP towers too, under 07_export/clip/
    prune: dict = field(default_factory=lambda: dict(PRUNE_DEFAULTS))  # MLP-channel pruning of the student (off by default)
    seed: int = 0

    def __post_init__(self):
        _positive(self, "windows", "window_len", "max_logit_diff", "prompts", "generate_tokens", "calibration_windows")
        if not 0.0 <= self.min_int8_agreement <= 1.0:
            raise ValueError(f"export.min_int8_agreement must be in [0, 1], got {self.min_int8_agreement}")
        if self.int8 not in ("auto", "dynamic", "static"):
            raise ValueError(f"export.int8 must be auto, dynamic or static, got {self.int8!r}")
        unknown = set(self.prune) - set(PRUNE_DEFAULTS)
        if unknown:
            raise ValueError(f"export.prune: unknown keys {sorted(unknown)}; expected {sorted(PRUNE_DEFAULTS)}")
        prune = {**PRUNE_DEFAULTS, **self.prune}
        object.__setattr__(self, "prune", prune)
        if not 0 < prune["keep_fraction"] <= 1:
            raise ValueError(f"export.prune.keep_fraction must be in (0, 1], got {prune['keep_fraction']}")
        for key in ("multiple_of", "calibration_windows", "batch_size"):
            if not (isinstance(prune[key], int) and prune[key] >= 1):
                raise ValueError(f"export.prune.{key} must be a positive integer, got {prune[key]!r}")
        if not (isinstance(prune["recovery_steps"], int) and prune["recovery_steps"] >= 0) or not prune["lr"] > 0:
            raise ValueError(f"export.prune: recovery_steps must be an integer >= 0 and lr positive, got "
                             f"{prune['recovery_steps']!r}, {prune['lr']!r}")


def _training_checks(section: str, cfg) -> None:
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{section}.dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"{section}.parallel must be ddp or fsdp, got {cfg.parallel!r}")
    for key in ("seq_len", "warmup_steps", "log_every", "mc_items"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{section}.{key} must be >= 0, got {getattr(cfg, key)}")


@dataclass(frozen=True)
class EvaluateConfig:
    qa_items: int = 500  # held-out multiple-choice items every model is scored on (0: all)
    batch_size: int = 16  # rows per forward when scoring (the scores do not depend on it)
    bias: bool = True  # the minimal-pairs bias probe (fm/eval/bias.py) on every model
    ppl_window: int = 128  # held-out perplexity: tokens per window
    ppl_windows_per_group: int = 16  # windows per (modality, source, language) group (0: no perplexity)
    icl_items: int = 120  # held-out knowledge and definition items for in-context learning (0: none)
    kshot: tuple = (0, 1, 4)  # demonstrations per prompt: the k-shot curve
    rag_top_k: int = 3  # retrieved triples before the question (0: no retrieval run)
    icl_models: tuple = ("pretrained", "student", "student_int8")  # the models the k-shot curve and retrieval run on
    knowledge_items: int = 100  # knowledge injection: facts per (task, language) and group, seen and unseen (0: none)
    seed: int = 0

    def __post_init__(self):
        _positive(self, "batch_size", "ppl_window")
        if self.ppl_windows_per_group < 0:
            raise ValueError(f"evaluate.ppl_windows_per_group must be >= 0, got {self.ppl_windows_per_group}")
        object.__setattr__(self, "kshot", tuple(int(k) for k in self.kshot))
        object.__setattr__(self, "icl_models", tuple(self.icl_models))
        if any(k < 0 for k in self.kshot) or self.icl_items < 0 or self.rag_top_k < 0:
            raise ValueError(f"evaluate: kshot, icl_items and rag_top_k must be >= 0, got {list(self.kshot)}, "
                             f"{self.icl_items}, {self.rag_top_k}")
        if self.qa_items < 0:
            raise ValueError(f"evaluate.qa_items must be >= 0 (0: all), got {self.qa_items}")
        if self.knowledge_items < 0:
            raise ValueError(f"evaluate.knowledge_items must be >= 0 (0: no knowledge probe), got {self.knowledge_items}")


@dataclass(frozen=True)
class PartitionsConfig:
    """Where the data stages run their per-partition work (fm.data.partitions); the outputs are the same either way."""

    runner: str = "local"  # local: in the stage's process; dask: Prefect tasks on a Dask cluster (prefect-dask)
    dask_address: str = ""  # a running scheduler (tcp://host:8786); empty: a local cluster for the stage's run
    dask_workers: int = 2  # worker processes of that local cluster

    def __post_init__(self):
        if self.runner not in ("local", "dask"):
            raise ValueError(f"partitions.runner must be local or dask, got {self.runner!r}")
        _positive(self, "dask_workers")


@dataclass(frozen=True)
class ScheduleConfig:
    """When `fm serve` runs the whole pipeline by itself (read by fm serve, not by a stage)."""

    enabled: bool = False  # off by default: `fm serve` serves the deployments without a schedule
    cron: str = "0 3 * * *"  # standard cron syntax, evaluated in `timezone`
    timezone: str = "UTC"

    def __post_init__(self):
        if len(self.cron.split()) != 5:
            raise ValueError(f"schedule.cron must have 5 fields (minute hour day month weekday), got {self.cron!r}")


@dataclass(frozen=True)
class Params:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    pretrain_clip: PretrainClipConfig = field(default_factory=PretrainClipConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    instructions: InstructionsConfig = field(default_factory=InstructionsConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    partitions: PartitionsConfig = field(default_factory=PartitionsConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def section_class(name: str) -> type:
    """The dataclass of params section `name` (ValueError naming the known sections)."""
    known = {f.name: f for f in dataclasses.fields(Params)}
    if name not in known:
        raise ValueError(f"unknown section '{name}' (known: {', '.join(known)})")
    t = known[name].type
    return t if isinstance(t, type) else globals()[t]


def parse_override(text: str) -> tuple[str, list[str], object]:
    """'section.key=value' or 'section.key.subkey=value' -> (section, key path, parsed value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    section, *keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"override {text!r} must look like section.key=value")
    try:
        return section, keys, yaml.safe_load(raw)
    except yaml.YAMLError:
        return section, keys, raw  # not YAML: the plain string (the type check says if a string is wrong)


def _apply_override(data: dict, text: str) -> None:
    """Set one override in the raw params mapping; a nested key edits one entry of a dict setting."""
    section, keys, value = parse_override(text)
    values = data.setdefault(section, {})
    if len(keys) == 1:
        values[keys[0]] = value
        return
    cls = section_class(section)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if keys[0] not in fields:
        raise ValueError(f"unknown key(s) in section '{section}': {keys[0]}")
    if keys[0] not in values:  # start from the code default of the dict setting
        f = fields[keys[0]]
        values[keys[0]] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    target = values[keys[0]]
    for key in keys[1:-1]:
        if not isinstance(target, dict):
            break
        target = target.setdefault(key, {})
    if not isinstance(target, dict):
        raise ValueError(f"override {text!r}: {section}.{'.'.join(keys[:-1])} is not a mapping")
    target[keys[-1]] = value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple = ()) -> Params:
    """Read params.yaml (a missing file means all defaults) and apply overrides."""
    path = Path(path)
    data: dict = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    data = copy.deepcopy({k: dict(v or {}) for k, v in data.items()})
    sections = {}
    try:
        for text in overrides:
            _apply_override(data, text)
        classes = {name: section_class(name) for name in data}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    for name, values in data.items():
        cls = classes[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) in section '{name}': {', '.join(unknown)}")
        try:
            checked = {key: _checked(f"{name}.{key}", value, fields[key].type) for key, value in values.items()}
            sections[name] = cls(**checked)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return Params(**sections)


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "tuple": (list, tuple)}
_WHAT = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "dict": "a mapping",
         "tuple": "a list"}


def _checked(key: str, value, annotation):
    """The value if it has the setting's type (an int where a float is wanted becomes a float); else ValueError."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    allowed = _TYPES.get(kind)
    if allowed is None:
        return value
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, allowed):
        raise ValueError(f"{key} = {value!r} must be {_WHAT[kind]}")
    return float(value) if kind == "float" else value


def describe_section(name: str, path: str | Path = "params.yaml") -> list[tuple[str, object, str]]:
    """(key, value in the params file or the code default, the file's comment) for each setting of a
    section: what `fm <stage> --help` lists."""
    comments: dict[str, str] = {}
    path = Path(path)
    if path.is_file():
        section = None
        for line in path.read_text(encoding="utf-8").splitlines():
            head = line.partition(" #")[0].rstrip()  # a section line may carry a comment too
            if head and not line[0].isspace() and head.endswith(":"):
                section = head[:-1]
            elif section == name and line.startswith("  ") and not line.startswith("   ") and ":" in line:
                key, _, rest = line.strip().partition(":")
                comments[key] = rest.partition(" #")[2].strip() if " #" in rest else ""
    values = getattr(load_params(path), name)
    return [(f.name, getattr(values, f.name), comments.get(f.name, "")) for f in dataclasses.fields(values)]
