"""How much memory a model needs on each GPU, worked out from its config before any weight
loads, and how its blocks are split over the GPUs of one replica.

Pure arithmetic (no torch): the cluster's controller checks a PruneJob with it before it
starts a GPU pod, and a local run prints it before loading. Every figure is in bytes:

- **weights**: the parameters of the modules a GPU holds, at the model's dtype. A block is
  q/k/v/o + gate/up/down (+ their biases) + its two RMSNorms; the first GPU also holds the
  embedding, the last the final norm and an untied LM head (a tied head stays with the
  embedding, on the first GPU).
- **candidate copies**: in ``per-group`` head mode a GQA block that keeps fewer than all
  query heads of each group gathers the kept rows of q_proj and columns of o_proj into new
  tensors (`pruned_model`): at most (G-1)/G of both, per block.
- **compensation means**: one mean per o_proj and down_proj input channel, per block.
- **refit state** (``pruning.refit`` only), float32 per block: for o_proj and down_proj
  the inverse Cholesky factor of the input covariance and W Σ L⁻ᵀ, 4·((Hq·d)² + I² + H·(Hq·d + I)),
  plus o_proj's input covariance, 4·(Hq·d)², in ``per-group`` mode with G > 1 (kept heads are
  not a prefix there); and the `REFIT_CACHE` refitted widths kept per projection, at most
  4·H·(Hq·d + I) in the dtype.
- **evaluation working set**, B = fitness.batchSize, L = fitness.seqLen, in the model's dtype:
  4·B·L·H of hidden states (residual, norm, attention output, block output) and the larger of
  attention's 2·B·L·(Hq+Hkv)·d (q, k, v and its output) and the MLP's 3·B·L·I (gate, up,
  their product). The attention kernel is assumed fused (PyTorch SDPA on CUDA), holding no
  L×L scores. The GPU with the LM head also holds the decoder's output, B·L·H, and one chunk
  of C = min(1024, L-1) positions of logits: B·C·V in the dtype plus twice in float32 (the
  float copy and the log-softmax of the cross entropy).
- **calibration working set**, once before the search (B = 1, L = calibration.seqLen): the
  block working set above, the float64 copy of down_proj's input and its square
  (2·L·I·8), and the float64 sum and sum of squares of each block's channels (2·8·(Hq·d + I)
  per block; they go to the host afterwards); with the refit also each block's float32 Gram
  matrices, 4·((Hq·d)² + I²).

- **a local LLM** (`llm.provider: local`, an llm-evolution search on the GPU it prunes on), in bf16:
  its weights, the KV cache of `llm.batchSize` sequences of C = max(2048, 128·N) tokens (N: the pruned
  model's blocks; its prompts list candidates of N rates: the longest prompt and reply seen with 28
  blocks was 3 201 tokens), 2·layers·Hkv·d·2 bytes a token, and its MLP's working set at prefill,
  3·B·C·I in bf16 (`generate` keeps the logits of the last position only).

A GPU needs weights + copies + means + refit state + the larger of the two working sets, and may use
`USABLE` of its memory (the CUDA context and the allocator's fragmentation take the rest), less what
other processes hold on it (`held`: a GPU shared with other jobs, as a local run finds it; planning
with the whole GPU there only defers the failure to an out-of-memory mid-search) and what a local LLM
beside the model takes (`llm`; counted on every GPU of the plan, though it sits on the first).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .architecture import Geometry, geometry_of
from .errors import DeviceFailed, UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
USABLE = 0.92
LOGITS_CHUNK = 1024  # evaluate.perplexity's logits_chunk
GIB = 1024 ** 3
MAX_GPUS = 64  # the CRD's bound on evaluator.gpusPerPod
REFIT_CACHE = 4  # refitted widths `pruned_model` keeps per projection and block
LLM_TOKENS_PER_BLOCK = 128  # a local LLM's prompt and reply, per block of the pruned model (see above)
LLM_MIN_TOKENS = 2048
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?$")
_UNITS = {None: 1, "k": 10 ** 3, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15,
          "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50}


def parse_bytes(quantity, field_name: str = "spec.evaluator.gpuMemory") -> int:
    """A Kubernetes memory quantity ("80Gi", "141G", "1.5Ti", a plain number of bytes)."""
    m = _QUANTITY.match(str(quantity).strip())
    if not m:
        raise UserError(f"{field_name}: {quantity!r} is not a memory quantity; write it like 80Gi or 141G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def config_from_json(d: dict):
    """A config.json read as plain JSON, with the attributes the plan reads (transformers' own
    defaults where a key is absent): the cluster's controller plans without importing it."""
    from types import SimpleNamespace

    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
            "vocab_size")
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserError(f"the model's config.json lacks {', '.join(missing)}; give a Hugging Face model folder")
    return SimpleNamespace(**{"num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False,
                              "attention_bias": False, "mlp_bias": False, **d})


def gib(n: int | float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20)):
        if n >= size / 10:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts from a config alone."""
    geometry: Geometry
    vocab_size: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @staticmethod
    def of(config) -> "ModelSize":
        attention_bias = bool(getattr(config, "attention_bias", False))
        return ModelSize(geometry=geometry_of(config), vocab_size=config.vocab_size,
                         tied=bool(getattr(config, "tie_word_embeddings", False)),
                         qkv_bias=attention_bias or config.model_type == "qwen2", o_bias=attention_bias,
                         mlp_bias=bool(getattr(config, "mlp_bias", False)))

    @property
    def block_params(self) -> int:
        g = self.geometry
        q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        n = g.block_params + 2 * g.hidden_size  # the weights of q/k/v/o, gate/up/down; two norms
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += g.hidden_size
        if self.mlp_bias:
            n += 2 * g.intermediate_size + g.hidden_size
        return n

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.geometry.hidden_size

    @property
    def head_params(self) -> int:
        """The untied LM head and the final norm."""
        return (0 if self.tied else self.embed_params) + self.geometry.hidden_size

    @property
    def total_params(self) -> int:
        return self.embed_params + self.geometry.num_layers * self.block_params + self.head_params


def local_llm(config, batch_size: int, blocks: int) -> int:
    """Bytes a local LLM of `config` takes on its GPU while it writes `batch_size` replies about a
    model of `blocks` blocks (the module docstring has the terms)."""
    size = ModelSize.of(config)
    g = size.geometry
    tokens = batch_size * max(LLM_MIN_TOKENS, LLM_TOKENS_PER_BLOCK * blocks)
    kv = 2 * g.num_layers * g.num_kv_heads * g.head_dim * 2 * tokens
    return 2 * size.total_params + kv + 3 * tokens * g.intermediate_size * 2


@dataclass(frozen=True)
class Workload:
    dtype: str = "bfloat16"
    batch_size: int = 1
    seq_len: int = 2048
    calibration_seq_len: int = 512
    head_mode: str = "per-group"
    refit: bool = False

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class GpuShare:
    device: int  # index within the replica
    blocks: list[int]  # [first, last] block indices, or [] for none
    weights: int
    copies: int
    means: int
    evaluation: int
    calibration: int
    refit: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.copies + self.means + self.refit + max(self.evaluation, self.calibration)


@dataclass
class MemoryPlan:
    params: int
    weights: int
    gpus: int  # GPUs available to the worker
    gpu_memory: int | None  # bytes per GPU; None: unknown (planned for one device)
    gpus_per_replica: int
    replicas: int
    shares: list[GpuShare] = field(default_factory=list)
    block_of: list[int] = field(default_factory=list)  # device index (within a replica) of each block
    head_device: int = 0
    on_cpu: bool = False  # the devices are the CPU (a local run without GPUs): no GPU to speak of
    held: int = 0  # bytes other processes hold on the fullest GPU (a GPU shared with other jobs)
    llm: int = 0  # bytes a local LLM takes beside the model (`local_llm`)

    @property
    def usable(self) -> int | None:
        return None if self.gpu_memory is None else max(0, int(self.gpu_memory * USABLE) - self.held - self.llm)

    def to_dict(self) -> dict:
        return {"params": self.params, "weights_bytes": self.weights, "gpus": self.gpus,
                "gpu_memory_bytes": self.gpu_memory, "usable_bytes": self.usable, "held_by_others_bytes": self.held,
                "local_llm_bytes": self.llm,
                "gpus_per_replica": self.gpus_per_replica, "replicas": self.replicas,
                "per_gpu": [{**asdict(s), "total": s.total} for s in self.shares]}

    def lines(self) -> list[str]:
        beside = [f"{gib(self.held)} held by other processes"] if self.held else []
        beside += [f"{gib(self.llm)} for the local LLM"] if self.llm else []
        beside = f" ({', '.join(beside)})" if beside else ""
        cap = f" of {gib(self.usable)} usable{beside}" if self.gpu_memory is not None else ""
        unit = "CPU device(s)" if self.on_cpu else "GPU(s)"
        layout = ("1 replica on the CPU" if self.on_cpu and self.gpus == 1 else
                  f"{self.replicas} replica(s) of {self.gpus_per_replica} {unit} on {self.gpus} {unit}")
        out = [f"memory plan: {_count(self.params)} parameters, {gib(self.weights)} of weights; {layout}"]
        for s in self.shares:
            where = f"blocks {s.blocks[0]}-{s.blocks[1]}" if s.blocks else "no blocks"
            out.append(f"  device {s.device}: {where}: weights {gib(s.weights)} + copies {gib(s.copies)} + "
                       f"means {gib(s.means)} + {f'refit {gib(s.refit)} + ' if s.refit else ''}working set {gib(max(s.evaluation, s.calibration))} "
                       f"= {gib(s.total)}{cap}")
        return out

    def device_map(self, devices: list[str]) -> dict[str, str]:
        """The module → device map of one replica, for `from_pretrained(device_map=...)`."""
        if len(devices) != self.gpus_per_replica:
            raise ValueError(f"a replica of this plan has {self.gpus_per_replica} devices, got {devices}")
        first, head = devices[0], devices[self.head_device]
        m = {"model.embed_tokens": first, "model.rotary_emb": first}
        m.update({f"model.layers.{i}": devices[d] for i, d in enumerate(self.block_of)})
        m.update({"model.norm": head, "lm_head": head})
        return m


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _split(size: ModelSize, k: int) -> list[int]:
    """Contiguous blocks per device, balanced by weight: block i goes to the device in whose
    k-th of the model's parameters (embedding first, head last) its midpoint falls."""
    block, total = size.block_params, size.total_params
    out = []
    for i in range(size.geometry.num_layers):
        middle = size.embed_params + i * block + block / 2
        out.append(min(k - 1, int(k * middle / total)))
    return out


def _shares(size: ModelSize, work: Workload, k: int) -> tuple[list[GpuShare], list[int], int]:
    g, b = size.geometry, work.bytes
    H, I, V, d = g.hidden_size, g.intermediate_size, size.vocab_size, g.head_dim
    q, kv = g.num_heads * d, g.num_kv_heads * d

    def working_set(batch: int, seq: int) -> int:
        return batch * seq * b * (4 * H + max(2 * (q + kv), 3 * I))

    B, L = work.batch_size, work.seq_len
    chunk = max(1, min(LOGITS_CHUNK, L - 1))
    head_extra = B * L * H * b + B * chunk * V * (b + 8)
    copies = (2 * H * q * (g.group_size - 1) // g.group_size
              if work.head_mode == "per-group" and g.group_size > 1 else 0)
    gram = 4 * (q * q + I * I) if work.refit else 0  # calibration's x xᵀ sums, float32
    linv, p = 4 * (q * q + I * I), 4 * H * (q + I)  # L⁻¹ and W Σ L⁻ᵀ, float32
    heads_cov = 4 * q * q if work.head_mode == "per-group" and g.group_size > 1 else 0
    refit = linv + p + heads_cov + REFIT_CACHE * H * (q + I) * b if work.refit else 0
    block_of = _split(size, k)
    head_device = 0 if size.tied else k - 1
    shares = []
    for dev in range(k):
        blocks = [i for i, x in enumerate(block_of) if x == dev]
        n = len(blocks)
        weights = n * size.block_params + (size.embed_params if dev == 0 else 0)
        if dev == head_device:
            weights += size.head_params
        evaluation = working_set(B, L) + (head_extra if dev == head_device else 0) if n or dev == head_device else 0
        calibration = (working_set(1, work.calibration_seq_len) + 2 * work.calibration_seq_len * I * 8
                       + n * 2 * 8 * (q + I) + n * gram) if n else 0
        shares.append(GpuShare(device=dev, blocks=[blocks[0], blocks[-1]] if blocks else [], weights=weights * b,
                               copies=n * copies * b, means=n * (q + I) * b, evaluation=evaluation,
                               calibration=calibration, refit=n * refit))
    return shares, block_of, head_device


def plan(config, work: Workload, *, gpus: int = 1, gpu_memory: int | None = None,
         gpus_per_replica: int = 0, on_cpu: bool = False, held: int = 0, llm: int = 0) -> MemoryPlan:
    """The split of `config`'s model over the fewest GPUs that hold it (or `gpus_per_replica`),
    and ⌊gpus / k⌋ replicas. Raises UserError, one line naming what to change, when it cannot fit
    (DeviceFailed where it would fit once other processes free the GPU). `on_cpu`: the devices are
    the CPU (the plan's lines then speak of it, not of GPUs); `held`: bytes other processes hold on
    a GPU, not usable; `llm`: bytes a local LLM takes beside the model (`local_llm`)."""
    size = ModelSize.of(config)
    gpus = max(1, gpus)

    def make(k: int) -> MemoryPlan:
        shares, block_of, head = _shares(size, work, k)
        return MemoryPlan(params=size.total_params, weights=size.total_params * work.bytes, gpus=gpus,
                          gpu_memory=gpu_memory, gpus_per_replica=k, replicas=gpus // k, shares=shares,
                          block_of=block_of, head_device=head, on_cpu=on_cpu, held=held, llm=llm)

    def fits(p: MemoryPlan) -> bool:
        return p.usable is None or all(s.total <= p.usable for s in p.shares)

    if gpus_per_replica:
        if gpus_per_replica > gpus:
            raise UserError(f"spec.evaluator.gpusPerReplica ({gpus_per_replica}) is more than the "
                            f"{gpus} GPU(s) of a worker; raise spec.evaluator.gpusPerPod or lower gpusPerReplica")
        chosen = make(gpus_per_replica)
        if fits(chosen):
            return chosen
        candidates = [gpus_per_replica]
    else:
        candidates = list(range(1, gpus + 1))
        for k in candidates:
            p = make(k)
            if fits(p):
                return p
    message = _refusal(size, work, make(candidates[-1]), make, fits, bool(gpus_per_replica))

    def on_idle(**kw) -> MemoryPlan | None:
        try:
            return plan(config, work, gpus=gpus, gpu_memory=gpu_memory, gpus_per_replica=gpus_per_replica,
                        on_cpu=on_cpu, **kw)
        except UserError:
            return None

    who_needs = "the model and the local LLM need" if llm else "the model needs"
    if held and (idle := on_idle(llm=llm)) is not None:
        # it fits once the others are done: later, not never (the advice to add GPUs would mislead)
        need = max(s.total for s in idle.shares) + llm
        raise DeviceFailed(f"the GPU is busy: {who_needs} {gib(need)} of a GPU "
                           f"({size.total_params / 1e9:.1f}B parameters in {work.dtype}), and other processes hold "
                           f"{gib(held)} of its {gib(gpu_memory)}; run the same command again once they free it, or "
                           "set CUDA_VISIBLE_DEVICES to a free GPU")
    if llm and on_idle() is not None:  # the model fits its GPUs alone: the LLM is what to move or shrink
        raise UserError(f"the model fits {gpus} GPU(s) of {gib(gpu_memory)} alone but not beside the local LLM "
                        f"({gib(llm)}: spec.llm.model's weights and the KV cache of spec.llm.batchSize prompts): "
                        "lower spec.llm.batchSize, put the LLM on another GPU (SELFPRUNER_LLM_DEVICE), or serve it "
                        "from an endpoint (spec.llm.provider: openai)")
    if held:  # too small even when the others are done: the advice stands
        message += (f" (other processes hold {gib(held)} of the GPU: once they free it, less may do; set "
                    "CUDA_VISIBLE_DEVICES to a free GPU)")
    raise UserError(message)


def _refusal(size: ModelSize, work: Workload, p: MemoryPlan, make, fits, fixed_k: bool) -> str:
    """One line: what did not fit in plan `p` (the widest tried), and the field to change."""
    worst = max(p.shares, key=lambda s: s.total)
    need = next((n for n in range(1, MAX_GPUS + 1) if fits(make(n))), None)
    what = (f"the model ({size.total_params / 1e9:.1f}B parameters, {gib(size.total_params * work.bytes)} in "
            f"{work.dtype}) does not fit {p.gpus_per_replica} GPU(s) of {gib(p.gpu_memory)} "
            f"(GPU {worst.device} needs {gib(worst.total)}, {gib(p.usable)} usable{', the rest held by other processes' if p.held else ''})")
    weights_fit = all(s.weights + s.copies + s.means + s.refit <= p.usable for s in p.shares)
    field_k = "spec.evaluator.gpusPerReplica" if fixed_k else "spec.evaluator.gpusPerPod"
    if not weights_fit:
        if need is None:
            return f"{what}: not even {MAX_GPUS} GPUs hold it; use GPUs with more memory or a smaller dtype"
        refit = ", or turn off spec.pruning.refit" if work.refit else ""
        return f"{what}: set {field_k} to at least {need}{refit}"
    more = f", or set {field_k} to at least {need}" if need else ""
    if work.refit and worst.calibration > worst.evaluation:
        return (f"{what}: the refit's state ({gib(worst.refit)}) and its calibration Gram matrices "
                f"(working set {gib(worst.calibration)}) are too large: turn off spec.pruning.refit{more}")
    return (f"{what}: the working set of fitness batch {work.batch_size} × {work.seq_len} tokens "
            f"({gib(worst.evaluation)}) is too large: lower spec.fitness.batchSize or spec.fitness.seqLen{more}")
