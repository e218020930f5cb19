"""All of fm's torch.distributed code: process groups, the 3D device mesh, and `parallelize`.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) `init_distributed` joins the process
group (NCCL on GPUs, gloo on CPU) and builds one DeviceMesh of shape (pp, dp, tp): tensor
parallelism innermost (neighbouring ranks, the fastest links: it talks every layer), pipeline
outermost (it only passes activations between stages). Rank r sits at
    pp = r // (dp * tp),   dp = (r // tp) % dp,   tp = r % tp.
Without torchrun it is a single process and nothing here touches torch.distributed. Models
stay single-device nn.Modules; `parallelize` cuts a pipeline stage out of one, then applies, in
a fixed order, tensor parallelism, activation checkpointing, torch.compile and data parallelism.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_size: int = 1
    pp_size: int = 1
    mesh: object = None  # DeviceMesh (pp, dp, tp) when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)


def init_distributed(device: str = "auto", tp: int = 1, pp: int = 1) -> Dist:
    """Join torchrun's process group if there is one; pick the device (cuda:LOCAL_RANK or cpu);
    build the (pp, dp, tp) mesh with dp = world_size // (tp * pp)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not dp * tp * pp: not a multiple of tp * pp = {tp} * {pp}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    mesh = None
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if use_cuda else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=10), device_id=dev if use_cuda else None)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (pp, world // (tp * pp), tp), mesh_dim_names=("pp", "dp", "tp"))
    return Dist(rank, world, local_rank, dev, tp, pp, mesh)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over all processes; the value itself in a single process."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def mean_loss(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean over data-parallel replicas of a loss held by the last pipeline stage (by every rank when pp = 1).

    The other stages contribute zero and the last stage pp times its loss, so the world mean is the dp mean.
    """
    if d.pp_size > 1:
        value = value * d.pp_size if d.pp_rank == d.pp_size - 1 else torch.zeros_like(value)
    return all_reduce_mean(value)


def clip_grad_norm_(parameters, max_norm: float, d: Dist) -> torch.Tensor:
    """torch's clip_grad_norm_ over the whole model: a DTensor norm (FSDP2, tensor parallel) is made
    whole, and with pp > 1 the stages' norms combine into the norm of all parameters."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if d.pp_size > 1:
        norm = norm.pow(2)
        dist.all_reduce(norm, group=d.mesh["pp"].get_group())
        norm = norm.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def broadcast_object(obj):
    """Rank 0's Python object on every rank (small things: a path, a step number)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's Python object, in rank order, on every rank ([obj] in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _checkpoint_block(block: nn.Module) -> None:
    """Recompute this block's activations in the backward pass instead of storing them.

    The block's own forward is wrapped in place, so parameter names (and so checkpoints)
    stay those of the plain model.
    """
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def stage_layers(n_layer: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage` of pp: contiguous ranges, the first n_layer % pp stages one longer."""
    base, extra = divmod(n_layer, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class PipelineStageModel(nn.Module):
    """One pipeline stage of a Decoder: its layer range, plus the embedding on the first stage and the
    final norm and LM head on the last. Parameter names are the Decoder's (`layers` is a ModuleDict
    keyed by the global layer index), so DCP checkpoints reshard between pipeline and plain layouts.

    forward: token ids (B, T) on the first stage, hidden states (B, T, C) on the others
    (B, T / tp, C under sequence parallelism); returns hidden states, or logits (B, T, V) on the last.
    """

    def __init__(self, model: nn.Module, layers: range, stage: int, num_stages: int):
        super().__init__()
        self.cfg = model.cfg
        self.tok_emb = model.tok_emb if stage == 0 else None
        self.drop = model.drop
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if stage == num_stages - 1 else None
        self.lm_head = model.lm_head if stage == num_stages - 1 else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        if self.cfg.attention != "dense":
            self.register_buffer("sparse_mask", model.sparse_mask, persistent=False)
        self.seq_shards = 1  # tensor parallel sets tp: hidden states between stages hold T / tp positions

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1] * (1 if self.tok_emb is not None else self.seq_shards)
        rope = (self.rope_cos[:T], self.rope_sin[:T])  # (T, D) each
        attn_mask, is_causal = None, self.cfg.causal and T > 1  # what Decoder._attention_mask gives in training
        if self.cfg.attention != "dense":
            attn_mask, is_causal = self.sparse_mask[:T, :T], False
        if self.tok_emb is not None:
            h = self.drop(self.tok_emb(h))  # (B, T, C)
        for block in self.layers.values():
            h, _ = block(h, rope, attn_mask, is_causal)  # (B, T, C)
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))  # (B, T, V)
        return h


class Pipeline:
    """This rank's pipeline stage and its schedule (GPipe or 1F1B over `microbatches` per batch).

    step(x, y) runs forward and backward of every microbatch, passing activations forward and
    gradients back between stages; the loss is computed on the last stage only.
    """

    def __init__(self, stage_module: nn.Module, d: Dist, microbatches: int, schedule: str, grad_accum: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.d, self.grad_accum = d, grad_accum
        self.is_first, self.is_last = d.pp_rank == 0, d.pp_rank == d.pp_size - 1
        stage = PipelineStage(stage_module, d.pp_rank, d.pp_size, d.device, group=d.mesh["pp"].get_group())

        def loss_fn(logits, targets):
            # The Decoder's loss, pre-divided so that the gradients summed over microbatches and grad_accum
            # steps are those of the mean. (The schedule's own scale_grads would divide the gradients already
            # accumulated by earlier grad_accum steps again.)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            return loss / (microbatches * grad_accum)

        schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        self.schedule = schedule_cls(stage, microbatches, loss_fn=loss_fn, scale_grads=False)
        self.microbatches = microbatches

    def _run(self, run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        run(*((x,) if self.is_first else ()), target=y if self.is_last else None, losses=losses if self.is_last else None)
        if not self.is_last:
            return torch.zeros((), device=self.d.device)
        return torch.stack(losses).detach().float().sum() * self.grad_accum  # the mean over microbatches

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of batch x, y (B, T); the mean loss on the last stage, 0 elsewhere."""
        return self._run(self.schedule.step, x, y)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run(self.schedule.eval, x, y)


def _gather_sequence(module: nn.Module, args: tuple) -> tuple:
    """Pre-hook of attention and MLP under sequence parallelism: all-gather the norm's sequence-sharded
    output (a DTensor) into the whole sequence; backward reduce-scatters the gradient."""
    from torch.distributed.tensor import DTensor, Replicate

    x = args[0]
    if isinstance(x, DTensor):
        x = x.redistribute(placements=[Replicate()])
    return (x, *args[1:])


def _tensor_parallel(model: nn.Module, blocks: list[nn.Module], tp_mesh) -> None:
    """Megatron-style tensor parallelism with sequence parallelism, through DTensor plans.

    In a block: wq/wk/wv and w_gate/w_up are column-parallel (each rank holds n_head / tp heads and
    ffn_hidden / tp columns), wo and w_down row-parallel; the norms run sequence-parallel on T / tp
    positions, so the residual stream between them is a (B, T / tp, C) shard. The embedding is
    vocabulary-parallel (rows of the table) and the LM head column-parallel over the vocabulary,
    gathered to full logits for the loss; a tied weight stays one (vocab-sharded) parameter. Every
    parameter is then a DTensor on the tp mesh, which clip_grad_norm_ and FSDP2 both need.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    tp = tp_mesh.size()
    tied = model.lm_head is not None and model.tok_emb is not None and model.lm_head.weight is model.tok_emb.weight
    plan = {}
    if model.tok_emb is not None:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.lm_head is not None:
        plan["norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    if tied:  # parallelize_module gave each module its own distributed copy: tie them again
        model.lm_head.weight = model.tok_emb.weight
    for block in blocks:
        # The model reshapes by its head counts: on a tp rank they are the local ones.
        block.attn.n_head //= tp
        block.attn.n_kv_head //= tp
        parallelize_module(block, tp_mesh, {
            "attn_norm": SequenceParallel(),
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=Shard(1)),
        })
        block.attn.register_forward_pre_hook(_gather_sequence)
        block.mlp.register_forward_pre_hook(_gather_sequence)


def check_layout(cfg, tp: int, pp: int) -> None:
    """ValueError when a model config cannot be laid out on tp x pp (cfg: a ModelConfig)."""
    if tp > 1:
        for name in ("n_head", "n_kv_head", "ffn_hidden", "seq_len"):
            if getattr(cfg, name) % tp:
                raise ValueError(f"pretrain.tp={tp} must divide model.{name} ({getattr(cfg, name)})")
        if cfg.moe_layers:
            raise ValueError("pretrain.tp > 1 supports dense MLPs only: set model.moe_layers to none")
    if pp > 1:
        if cfg.n_layer < pp:
            raise ValueError(f"pretrain.pp={pp} stages need at least {pp} layers, the model has {cfg.n_layer}")
        if cfg.tie_embeddings:
            raise ValueError("pretrain.pp > 1 needs model.tie_embeddings=false: the embedding (first stage) and the "
                             "LM head (last stage) live on different ranks")
        if cfg.moe_layers:
            raise ValueError("pretrain.pp > 1 supports dense models only: set model.moe_layers to none")


def _no_offload_reason(cfg, d: Dist) -> str | None:
    if d.device.type == "cpu":
        return "this run is on the CPU, where parameters, gradients and optimizer state already live in CPU memory"
    if cfg.parallel != "fsdp" or d.dp_size == 1:
        return "it applies to FSDP2 (parallel: fsdp with dp > 1), which shards over host memory"
    return None


def offload_to_cpu(cfg, d: Dist) -> bool:
    """Whether FSDP2 keeps the sharded state in host memory: cpu_offload on accelerators with FSDP2 only
    (FSDP2's CPUOffloadPolicy needs an accelerator to copy to, and fails on a CPU-only machine)."""
    return bool(cfg.cpu_offload) and _no_offload_reason(cfg, d) is None


def parallelize(model: nn.Module, d: Dist, cfg) -> tuple[nn.Module, Pipeline | None]:
    """Lay a single-device Decoder out on the (pp, dp, tp) mesh, in this order:

    0. pipeline (pp > 1): keep only this stage's layer range (PipelineStageModel; the rest is freed);
    1. tensor parallel (tp > 1) over the tp mesh: column/row-wise linears, sequence-parallel norms,
       vocabulary-parallel embedding and head (before anything wraps the modules it names);
    2. activation checkpointing per block (before compile, so compile sees the recompute regions);
    3. torch.compile per block (a repeated block compiles once and keeps graph breaks local);
    4. data parallelism over the dp mesh: DDP, or FSDP2 `fully_shard` on every block and then on the
       root (embedding, final norm, head), with optional CPU offload (accelerators only: on a CPU-only
       run it is a no-op with a note). With tensor parallelism FSDP2 shards the tp-local DTensors again
       over dp (2D); dp > 1 with tp or pp > 1 needs parallel=fsdp;
    5. the pipeline schedule (pp > 1) around the wrapped stage.
    cfg needs: parallel, activation_checkpointing, compile, cpu_offload, pp_microbatches, pp_schedule,
    grad_accum. Returns the module to train (the DDP wrapper, the stage, or the model) and the Pipeline
    (None when pp = 1).
    """
    mode = cfg.parallel
    if cfg.cpu_offload and d.is_main and not offload_to_cpu(cfg, d):
        print(f"pretrain: cpu_offload is a no-op here: {_no_offload_reason(cfg, d)}", file=sys.stderr)
    if mode not in PARALLEL_MODES:
        raise ValueError(f"pretrain.parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    check_layout(model.cfg, d.tp_size, d.pp_size)
    if (d.tp_size > 1 or d.pp_size > 1) and d.dp_size > 1 and mode == "ddp":
        # DDP cannot wrap DTensor parameters, and its bucket rebuild breaks on a pipeline's microbatches.
        raise ValueError("pretrain.tp > 1 or pp > 1 with dp > 1 needs pretrain.parallel=fsdp")
    if d.pp_size > 1:
        model = PipelineStageModel(model, stage_layers(model.cfg.n_layer, d.pp_size, d.pp_rank), d.pp_rank, d.pp_size)
    blocks = list(model.layers.values()) if isinstance(model.layers, nn.ModuleDict) else list(model.layers)
    if d.tp_size > 1:
        _tensor_parallel(model, blocks, d.mesh["tp"])
        if d.pp_size > 1:
            model.seq_shards = d.tp_size
    for block in blocks:
        if cfg.activation_checkpointing:
            _checkpoint_block(block)
        if cfg.compile:
            block.compile()
    if d.dp_size > 1 and mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)  # pp = tp = 1: dp is the world
    elif d.dp_size > 1:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kwargs = {"mesh": d.mesh["dp"]}
        if offload_to_cpu(cfg, d):
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
        fully_shard(model, **kwargs)
    pipeline = None
    if d.pp_size > 1:
        pipeline = Pipeline(model, d, cfg.pp_microbatches, cfg.pp_schedule, cfg.grad_accum)
    return model, pipeline


def gather_pipeline_state(state: dict, d: Dist) -> dict:
    """pp > 1: every stage's full (dp- and tp-gathered) weights, merged on rank 0 ({} elsewhere)."""
    if d.pp_size == 1:
        return state
    mine = {k: v.detach().cpu() for k, v in state.items()} if (d.dp_rank == 0 and d.tp_rank == 0) else {}
    parts = [None] * d.world_size if d.is_main else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if d.is_main else {}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 modifies the model in place, nothing to unwrap)."""
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model
