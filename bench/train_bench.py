"""Training throughput of fm's Decoder against Hugging Face GPT-2 and litgpt GPT of the same size, interleaved.

    .venv/bin/python bench/train_bench.py [--repeats 3] [--steps 5] [--warmup 1] [--modes eager,compile]
        [--models fm,hf,litgpt] [--device cpu] [--preset small] [--batch-size 8] [--threads 2]

Three models of one size (the `--preset` of fm.models.decoder.PRESETS; `small` = 6 layers x 384,
6 heads, seq 256, vocab 8192), each built from its own package:
  fm      fm.models.decoder.Decoder: RoPE, RMSNorm, SwiGLU, SDPA, tied embeddings; GPT-2 init
  hf      transformers' GPT2LMHeadModel(GPT2Config): learned positions, LayerNorm, GELU MLP (4d),
          biases, tied embeddings; its own init (GPT-2's: normal(0.02), c_proj scaled by 1/sqrt(2L))
  litgpt  litgpt.model.GPT(litgpt.config.Config) in its LLaMA-like form, the closest to fm: RoPE on
          the full head, RMSNorm, LLaMAMLP (SwiGLU) of fm's width, no biases, sequential residual;
          its embedding and LM head tied (as fm's and GPT-2's are) and GPT-2 init applied here
          (normal(0.02), attn.proj and mlp.proj scaled by 1/sqrt(2L)). litgpt's own pretrain script
          uses the GPT-NeoX small init instead; either keeps weights far from denormals.
The peers' loss is F.cross_entropy on their logits, as fm's forward computes it (litgpt's pretrain
splits it into 128-row chunks, which ran slower on the CPU). Every model trains with the same AdamW
(fused where the device has it, else foreach; lr 3e-4, betas (0.9, 0.95), weight decay 0.1 on
matrices) and gradient clipping at 1.0, on the same random-token batches (B, T) with next-token
targets, fp32 on CPU (bf16 autocast on CUDA), with `--threads` intra-op threads and denormals
flushed to zero. Each model runs eager and torch.compile'd (the whole model; compiled and warmed up
before any timing).

Timing is interleaved: for every repeat, each (model, mode) runs `--warmup` untimed then
`--steps` timed optimizer steps, the order rotating by one every repeat. Reported per (model,
mode): the median step time over all timed steps -> tokens/s, and MFU = flops_per_token *
tokens/s / peak, where flops_per_token = 6 N + 12 L d T (PaLM / nanoGPT; N = the weights a token
multiplies by = non-embedding parameters + LM head, counted from each model's actual parameters)
and peak = the median of the fp32 (bf16 on CUDA) matmul FLOP/s measured before the first timed block
and after every one (fm.train.loop.measure_matmul_peak; MFU against their max is printed too). The
load average before and after, and each row's CPU share (process CPU time / wall time / threads),
are recorded: compare only runs made in one invocation. fm/peer ratios are printed from the medians,
repeat by repeat, and from each one's fastest step (the least disturbed by other load). JSON goes to
bench/results/train.json.

Peers: transformers and litgpt, installed without moving fm's pins by the two commands in
bench/README.md (litgpt 0.5.13 with --no-deps: it asks for huggingface-hub<1.4, yet imports and
trains with fm's 2.4.0).

On a GPU: `--device cuda --preset base` (~124M: 12 x 768, seq 1024, vocab 50304; GPT-2 small peers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fm.models.decoder import PRESETS, Decoder, ModelConfig  # noqa: E402
from fm.train.loop import measure_matmul_peak  # noqa: E402

MODELS = ("fm", "hf", "litgpt")
MODES = ("eager", "compile")
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 3e-4, (0.9, 0.95), 0.1, 1.0


def build_fm(cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    """fm's Decoder and its loss: the model computes cross-entropy itself."""
    model = Decoder(cfg)

    def loss_of(m, x, y):
        return m(x, y)[1]

    return model, loss_of


def build_hf(cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    """transformers' GPT2LMHeadModel of cfg's size, with its own (GPT-2) init; logits -> cross-entropy."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
    model = GPT2LMHeadModel(hf_cfg)

    def loss_of(m, x, y):
        logits = m(input_ids=x).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return model, loss_of


def build_litgpt(cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    """litgpt's GPT in its LLaMA-like form at cfg's size, head tied to the embedding, GPT-2 init."""
    from litgpt.config import Config
    from litgpt.model import GPT

    lit_cfg = Config(name="fm-bench", block_size=cfg.seq_len, vocab_size=cfg.vocab_size,
                     padded_vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_query_groups=cfg.n_kv_head, n_embd=cfg.d_model, rotary_percentage=1.0,
                     parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=cfg.norm_eps,
                     mlp_class_name="LLaMAMLP", intermediate_size=cfg.ffn_hidden, rope_base=int(cfg.rope_theta))
    model = GPT(lit_cfg)
    model.lm_head.weight = model.transformer.wte.weight
    with torch.no_grad():
        model.apply(model._init_weights)  # normal(0.02) for every Linear and Embedding
        for block in model.transformer.h:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def loss_of(m, x, y):
        logits = m(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return model, loss_of


BUILDERS = {"fm": build_fm, "hf": build_hf, "litgpt": build_litgpt}


def count_matmul_params(model: nn.Module) -> int:
    """N of the 6N convention: every parameter except embedding tables (lookups), plus the LM head.

    The LM head is found as the Linear whose weight has the vocabulary's shape; when it is tied to
    the token embedding it is still a matmul and counted once.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    unique = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for i, p in unique.items() if i not in embeddings)
    vocab = max(m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Embedding))
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.shape[0] == vocab]
    assert len(heads) == 1, "expected exactly one LM head"
    return n + (heads[0].weight.numel() if id(heads[0].weight) in embeddings else 0)


def build_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """The same AdamW for every model: matrices decay, vectors do not; fused kernel where available."""
    params = list({id(p): p for p in model.parameters()}.values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS, foreach=True)


class Runner:
    """One (model, mode): a model, its optimizer and a train step; keeps its own step times."""

    def __init__(self, name: str, mode: str, cfg: ModelConfig, device: torch.device, autocast_dtype):
        torch.manual_seed(0)
        model, self.loss_of = BUILDERS[name](cfg)
        self.model = model.to(device).train()
        self.name, self.mode, self.device = name, mode, device
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        self.matmul_params = count_matmul_params(model)
        self.optimizer = build_optimizer(model)
        self.forward = torch.compile(model) if mode == "compile" else model
        self.autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
        self.times: list[float] = []  # wall seconds per timed step
        self.cpu_times: list[float] = []  # CPU seconds of this process (all threads) per timed step
        self.losses: list[float] = []
        self.setup_s = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = self.loss_of(self.forward, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, batches: list, steps: int, timed: bool) -> None:
        """`steps` train steps cycling through batches; each one timed (device synchronized) if asked."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        for i in range(steps):
            x, y = batches[i % len(batches)]
            t, c = time.perf_counter(), time.process_time()
            loss = self.step(x, y)
            sync()
            if timed:
                self.times.append(time.perf_counter() - t)
                self.cpu_times.append(time.process_time() - c)
                self.losses.append(loss.item())


def random_batches(n: int, batch_size: int, cfg: ModelConfig, device: torch.device) -> list:
    """n (x, y) pairs of random token ids (B, T), y the next token of x."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        seq = torch.randint(cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=g)  # (B, T+1)
        out.append((seq[:, :-1].to(device), seq[:, 1:].to(device)))
    return out


def cpu_info() -> str:
    """CPU model name and the vector ISA flags that decide fp32 vs bf16 speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(isa)})"


def version(package: str) -> str | None:
    """Installed version of a package, None when it is missing."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_interleaved(runners: list[Runner], batches: list, args, device: torch.device, peak_dtype) -> list[float]:
    """`--repeats` rounds of every runner's warmup + timed steps, order rotated each round; returns the
    matmul peaks measured before the first runner and after every one (half a second each)."""
    peaks = [measure_matmul_peak(device, peak_dtype)]
    for rep in range(args.repeats):
        k = rep % len(runners)
        for runner in runners[k:] + runners[:k]:
            runner.run(batches, args.warmup, timed=False)
            runner.run(batches, args.steps, timed=True)
            peaks.append(measure_matmul_peak(device, peak_dtype))
        latest = ", ".join(f"{p / 1e9:.0f}" for p in peaks[-len(runners):])
        print(f"  repeat {rep + 1}/{args.repeats}: matmul peaks {latest} GFLOP/s, load {os.getloadavg()[0]:.2f}")
    return peaks


def summarize(runner: Runner, cfg: ModelConfig, args, peak: float, peak_max: float) -> dict:
    """One row of the report: median step time -> tokens/s and MFU (against the median and the max peak)."""
    flops_per_token = 6 * runner.matmul_params + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
    step_s = statistics.median(runner.times)
    tokens_per_s = args.batch_size * cfg.seq_len / step_s
    k = args.steps
    return dict(model=runner.name, mode=runner.mode, params=runner.n_params, matmul_params=runner.matmul_params,
                flops_per_token=flops_per_token, step_s=step_s, step_s_min=min(runner.times),
                step_s_per_repeat=[statistics.median(runner.times[i * k:(i + 1) * k]) for i in range(args.repeats)],
                # CPU time of this process over wall time x threads: well under 1 when the cores were shared
                cpu_share=sum(runner.cpu_times) / sum(runner.times) / torch.get_num_threads(),
                tokens_per_s=tokens_per_s, mfu=flops_per_token * tokens_per_s / peak,
                mfu_at_max_peak=flops_per_token * tokens_per_s / peak_max, setup_s=runner.setup_s,
                last_loss=runner.losses[-1])


def fm_ratios(rows: list[dict]) -> dict[str, dict]:
    """fm's tokens/s over each peer's, per mode: median over all timed steps, repeat by repeat, and at the
    fastest step of each (contention only ever adds time, so the best step is the least disturbed)."""
    ratios = {}
    for fm_row in (r for r in rows if r["model"] == "fm"):
        for row in rows:
            if row["mode"] == fm_row["mode"] and row["model"] != "fm":
                per_repeat = [p / f for f, p in zip(fm_row["step_s_per_repeat"], row["step_s_per_repeat"])]
                ratios[f"fm/{row['model']} {row['mode']}"] = dict(
                    ratio=fm_row["tokens_per_s"] / row["tokens_per_s"], per_repeat=per_repeat,
                    repeats_ahead=sum(r > 1 for r in per_repeat), best_step=row["step_s_min"] / fm_row["step_s_min"])
    return ratios


def print_report(rows: list[dict], ratios: dict, peaks: list[float], loads: tuple) -> None:
    print(f"\n{'model':<8}{'mode':<9}{'N (M)':>7}{'step ms':>9}{'best ms':>9}{'tokens/s':>10}{'MFU':>7}{'MFU@max':>9}"
          f"{'cpu share':>11}   repeat medians (ms)")
    for row in rows:
        reps = " ".join(f"{s * 1e3:.0f}" for s in row["step_s_per_repeat"])
        print(f"{row['model']:<8}{row['mode']:<9}{row['matmul_params'] / 1e6:>7.2f}{row['step_s'] * 1e3:>9.0f}"
              f"{row['step_s_min'] * 1e3:>9.0f}{row['tokens_per_s']:>10.0f}{row['mfu']:>7.1%}"
              f"{row['mfu_at_max_peak']:>9.1%}{row['cpu_share']:>11.2f}   {reps}")
    print(f"\nMFU against the median matmul peak {statistics.median(peaks) / 1e9:.1f} GFLOP/s, MFU@max against the "
          f"max {max(peaks) / 1e9:.1f} (all: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    print(f"load average (1, 5, 15 min) before {loads[0]}, after {loads[1]}")
    for name, r in ratios.items():
        print(f"{name:<20} {r['ratio']:.3f}   best step {r['best_step']:.3f}   per repeat "
              f"{' '.join(f'{x:.2f}' for x in r['per_repeat'])} (ahead in {r['repeats_ahead']}/{len(r['per_repeat'])})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per (model, mode) per repeat")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each timed block")
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--models", default="fm,hf,litgpt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="fm preset (default: small on CPU, base on CUDA)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on CPU")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "train.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    args.preset = args.preset or ("base" if device.type == "cuda" else "small")
    cfg = PRESETS[args.preset]
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := (set(models) - set(MODELS)) | (set(modes) - set(MODES)):
        ap.error(f"unknown models or modes: {sorted(unknown)}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # a denormal-heavy init once made peers 3-10x slower on the CPU
    # bf16 autocast on CUDA; fp32 on CPU, where (AVX-512 without AMX) bf16 matmuls run at ~0.55x fp32
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    peak_dtype = autocast_dtype or torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()

    load_before = os.getloadavg()
    print(f"{device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"preset {args.preset}, B {args.batch_size} x T {cfg.seq_len}, {peak_dtype}, load average {load_before}")
    batches = random_batches(4, args.batch_size, cfg, device)
    runners = []
    for name in models:
        for mode in modes:
            t = time.perf_counter()
            runner = Runner(name, mode, cfg, device, autocast_dtype)
            runner.run(batches, 2, timed=False)  # under compile: traces and compiles forward and backward
            runner.setup_s = time.perf_counter() - t
            print(f"  built {name}/{mode} in {runner.setup_s:.1f}s: {runner.n_params / 1e6:.2f}M params, "
                  f"N = {runner.matmul_params / 1e6:.2f}M")
            runners.append(runner)
            if name == "fm" and 6 * runner.matmul_params + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len \
                    != cfg.flops_per_token():
                raise RuntimeError("count_matmul_params disagrees with ModelConfig.flops_per_token")

    peaks = run_interleaved(runners, batches, args, device, peak_dtype)
    loads = (load_before, os.getloadavg())
    # The median peak is the denominator: on a shared machine the max of several measurements is a lucky burst.
    rows = [summarize(r, cfg, args, statistics.median(peaks), max(peaks)) for r in runners]
    ratios = fm_ratios(rows)
    print_report(rows, ratios, peaks, loads)

    result = dict(device=str(device), device_name=device_name, torch=torch.__version__,
                  transformers=version("transformers"), litgpt=version("litgpt"), threads=torch.get_num_threads(),
                  env={k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "MALLOC_", "LD_PRELOAD"))},
                  preset=args.preset, batch_size=args.batch_size, seq_len=cfg.seq_len, dtype=str(peak_dtype),
                  repeats=args.repeats, steps=args.steps, warmup=args.warmup,
                  peak_flops=statistics.median(peaks), peak_rule="median", peaks_flops=peaks,
                  load_average_before=loads[0], load_average_after=loads[1], rows=rows, ratios=ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
