"""The recipe's sections: one typed dataclass each, a docstring under every field with its unit, and the rules a
value must keep, checked at construction. README.md's key tables are generated from these docstrings
(scripts/recipe_keys.py; tests/test_recipe.py fails when they drift).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field

QUANT_TYPES = ("nf4", "fp4", "int8", "none")
OPTIMIZERS = ("paged_adamw8bit", "adamw8bit", "adamw")
RESETS = ("magnitude", "random", "zero", "keep")
INITS = ("random", "gradient")
CYCLES = ("lora", "projected")
FIDELITIES = ("master", "naive")
MASTER_STORES = ("ram", "disk")
DTYPES = ("bf16", "fp32")
# Fields a resumed run may change: how long, where and how much is reported, not what is trained.
RESUME_SAFE = ("train.max_steps", "train.device", "train.threads", "train.loss_chunk_tokens",
               "train.offload_activations", "relora.master",
               "relora.check_ranks", "eval.every", "eval.batches",
               "log.every", "log.tensorboard", "log.wandb", "checkpoint.every", "checkpoint.keep_last",
               "checkpoint.max_bad_steps")


class RecipeError(ValueError):
    """A recipe the trainer cannot run; the message is one line meant for the user. `key`: the "section.key" it is
    about, where there is one (an error about a --set names that option rather than the file)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class ModelConfig:
    """The network: a local/hub pretrained model, or a LLaMA built from the sizes below."""

    pretrained: str = ""
    """local model directory or hub name to start from (any causal LM transformers loads); empty = a random LLaMA of the
    sizes below, which a pretrained model ignores
    """
    vocab_size: int = 0
    """embedding rows, in tokens; 0 = the tokenizer's size (set it so `memory-estimate` works offline)"""
    hidden_size: int = 256
    """width of the residual stream, in features"""
    intermediate_size: int = 688
    """MLP width, in features"""
    num_layers: int = 4
    """decoder blocks"""
    num_heads: int = 4
    """attention heads"""
    num_kv_heads: int = 0
    """key/value heads (grouped-query attention); 0 = `num_heads`"""
    max_position_embeddings: int = 2048
    """longest sequence the model accepts, in tokens"""
    tie_embeddings: bool = False
    """share the input embedding with `lm_head`"""
    dtype: str = "bf16"
    """storage dtype of trainable full-rank weights and LoRA factors: `bf16` or `fp32`"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""

    def __post_init__(self):
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_position_embeddings")
        _choice(self, "dtype", DTYPES)
        if self.vocab_size < 0:
            raise _rule(self, "vocab_size", "must be >= 0 (0 = the tokenizer's size)")
        if self.hidden_size % self.num_heads:
            raise _rule(self, "hidden_size", "must be divisible by model.num_heads")
        if self.num_kv_heads < 0 or (self.num_kv_heads and self.num_heads % self.num_kv_heads):
            raise _rule(self, "num_kv_heads", "must be 0 or divide model.num_heads")


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut into training blocks."""

    source: str = "pydoc"
    """`pydoc` (CPython's bundled docs, ~465 KB), a file, directory or glob of `.txt`/`.jsonl`/`.json`/`.parquet` (one
    `.txt` file: documents split at blank lines; several: one per file), `hub:NAME` (streamed), or `prepared:DIR`
    (token files from `lean-relora prepare`; the fields that chose and split the documents are then the manifest's)
    """
    hub_config: str = ""
    """configuration of a hub dataset (`en` for `allenai/c4`)"""
    split: str = "train"
    """split of a hub dataset"""
    text_column: str = "text"
    """column holding the documents in jsonl/parquet/hub data"""
    tokenizer: str = ""
    """`""`: the pretrained model's own, or `bpe` without `model.pretrained`; `bpe`: train a byte-level BPE on the
    corpus (refused with `model.pretrained`); else a local directory or hub name. Copied into the run dir either way
    """
    bpe_vocab_size: int = 4096
    """vocabulary of the trained BPE, in tokens"""
    seq_len: int = 128
    """tokens per training block (documents joined with EOS, BOS before each where the tokenizer has one, packed)"""
    eval_fraction: float = 0.05
    """share of documents held out for evaluation (local data)"""
    eval_documents: int = 200
    """documents held out from the start of a streamed dataset"""
    shuffle_seed: int = 0
    """seed of the document split and the per-epoch block order"""
    max_documents: int = 0
    """read at most this many documents; 0 = all"""
    document_mask: bool = False
    """`true`: position ids restart at each document of a packed block and attention stays within it (block-diagonal
    mask; slower); `false`: causal over the whole block
    """

    def __post_init__(self):
        _positive(self, "seq_len", "bpe_vocab_size", "eval_documents")
        if not 0.0 < self.eval_fraction < 1.0:
            raise _rule(self, "eval_fraction", "must be in (0, 1)")
        if self.max_documents < 0:
            raise _rule(self, "max_documents", "must be >= 0")


@dataclass
class LoraConfig:
    """The low-rank factors and the frozen base they sit on."""

    rank: int = 8
    """r: inner dimension of B (out x r) A (r x in)"""
    alpha: float = 16.0
    """the update is scaled by alpha / r"""
    dropout: float = 0.0
    """dropout probability on the LoRA branch input"""
    targets: list[str] = field(default_factory=list)
    """`nn.Linear`/`Conv1D` modules of the decoder blocks to wrap: names or regexes matched against the last part of the
    module name; `[]` = all of them
    """
    quant: str = "nf4"
    """frozen base storage: `nf4`, `fp4` (bnb 4-bit), `int8` (bnb row-wise), `none` (frozen `model.dtype`)"""
    blocksize: int = 64
    """4-bit quantization block, in elements"""
    double_quant: bool = True
    """quantize the 4-bit absmax statistics again (~0.4 bit/param less)"""
    train_embeddings: bool = True
    """embeddings train full-rank (as in the paper)"""
    train_norms: bool = True
    """norm weights train full-rank"""
    train_lm_head: bool = True
    """`lm_head` trains full-rank"""

    def __post_init__(self):
        _positive(self, "rank", "alpha")
        _choice(self, "quant", QUANT_TYPES)
        if not 0.0 <= self.dropout < 1.0:
            raise _rule(self, "dropout", "must be in [0, 1)")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise _rule(self, "blocksize", "must be one of 64, 128, 256, 512, 1024, 2048, 4096")


@dataclass
class ReloraConfig:
    """Restarts: merge, re-init, optimizer reset, LR re-warm."""

    restart_every: int = 100
    """steps per cycle; a merge happens every `restart_every` steps after the warm start"""
    restart_warmup_steps: int = 10
    """steps of linear LR re-warm from 0 after each restart (paper: 50-100)"""
    warm_start_steps: int = 0
    """full-rank steps (dense base, everything trains) before ReLoRA begins; equal to `train.max_steps`: a full-rank
    baseline run
    """
    reset: str = "magnitude"
    """optimizer reset of the LoRA factors' moments at a restart: `magnitude`, `random` or `zero` pruning, or `keep`
    (untouched, as GaLore keeps its moments when it switches subspace)
    """
    reset_ratio: float = 0.999
    """share of each moment zeroed by `magnitude`/`random` pruning (paper: 0.99-0.999)"""
    fidelity: str = "master"
    """`master`: an fp32 copy of each base weight off the GPU keeps every merge; `naive`: requantize the dequantized
    weight (loses small updates)
    """
    master: str = "ram"
    """where the fp32 masters live: `ram` (host RAM, 4 bytes per base weight) or `disk` (`RUN_DIR/master/`, one
    memory-mapped file per layer and merge generation: host RAM holds one layer during a merge; checkpoints hard-link
    the generation they need instead of copying it, so disk holds the current generation plus one per kept checkpoint
    at most); may change on resume
    """
    check_ranks: bool = False
    """with several ranks (`--nproc`, torchrun): after each merge compare every stored base across the ranks (sha256)
    and stop with an error on a difference; a debug check that copies each base to host RAM once per restart; may
    change on resume
    """
    init: str = "random"
    """each cycle's A: `random` (Kaiming-uniform) or `gradient`: the top-r right singular vectors of the layer's weight
    gradient, estimated without the dense gradient by a randomized range finder over `init_batches` micro-batches, at
    every restart and when ReLoRA follows a warm start; rows scaled to Kaiming's expected norm, B stays zero
    (`lean_relora/model/gradinit.py`; results in docs/benchmarks.md)
    """
    cycle: str = "lora"
    """what a cycle trains: `lora` (A and B, the paper's ReLoRA) or `projected`: A is set at every restart with
    orthonormal rows (the gradient's top right singular subspace with `init = "gradient"`, else a random orthonormal
    basis) and stays frozen while only B trains, which is GaLore's update with a right projection P = A^T and its
    `scale` = `lora.alpha / lora.rank` (no gradient or moments for A: LoRA's memory; docs/benchmarks.md compares it)
    """
    init_batches: int = 4
    """micro-batches (of the data order: the steps after it see the data they would have seen after them) each gradient
    init consumes; each goes forward and backward twice, and both passes count in the run's tokens
    """

    def __post_init__(self):
        _positive(self, "restart_every")
        _choice(self, "reset", RESETS)
        _choice(self, "fidelity", FIDELITIES)
        _choice(self, "master", MASTER_STORES)
        _choice(self, "init", INITS)
        _choice(self, "cycle", CYCLES)
        _positive(self, "init_batches")
        if self.restart_warmup_steps < 0 or self.warm_start_steps < 0:
            raise _rule(self, "restart_warmup_steps", "must be >= 0")
        if self.restart_warmup_steps >= self.restart_every:
            raise _rule(self, "restart_every",
                        f"must be longer than relora.restart_warmup_steps ({self.restart_warmup_steps})")
        if not 0.0 <= self.reset_ratio < 1.0:
            raise _rule(self, "reset_ratio", "must be in [0, 1)")


@dataclass
class OptimConfig:
    """The optimizer and the global jagged-cosine learning rate."""

    name: str = "paged_adamw8bit"
    """`paged_adamw8bit`, `adamw8bit` (bitsandbytes) or `adamw` (torch, 32-bit)"""
    lr: float = 1e-3
    """peak learning rate"""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam beta1, beta2"""
    eps: float = 1e-8
    """Adam epsilon"""
    weight_decay: float = 0.0
    """decoupled weight decay on matrices; norms and biases get none"""
    grad_clip: float = 1.0
    """max global gradient L2 norm; 0 = off"""
    warmup_steps: int = 10
    """steps of the first linear warmup"""
    min_lr_ratio: float = 0.1
    """the cosine decays to `lr * min_lr_ratio` at `max_steps`"""

    def __post_init__(self):
        _choice(self, "name", OPTIMIZERS)
        _positive(self, "lr", "eps")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _rule(self, "betas", "must be two numbers in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise _rule(self, "weight_decay", "weight_decay, grad_clip and warmup_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _rule(self, "min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainConfig:
    """The loop: how many steps, how large, where."""

    max_steps: int = 200
    """optimizer steps in the run, warm start included"""
    micro_batch_size: int = 8
    """sequences per forward/backward, per rank (with `--nproc N` a step sees N x micro_batch_size x grad_accum_steps)
    """
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""
    seed: int = 0
    """seed of model init, LoRA init and dropout"""
    device: str = "auto"
    """`auto` (CUDA if present), `cpu` or `cuda`"""
    autocast: str = "auto"
    """bf16 autocast: `auto` (on CUDA with bf16), `bf16` or `none`"""
    threads: int = 0
    """CPU threads for torch; 0 = torch's default"""
    loss_chunk_tokens: int = 1024
    """tokens whose logits the loss holds at once; each chunk's logits are recomputed in backward, so a micro-batch
    never holds all of them (1.7 GiB for 8 x 512 tokens of a 32k vocabulary). Equal to Hugging Face's loss within
    fp32 rounding. 0 = Hugging Face's own loss
    """
    offload_activations: bool = False
    """on a GPU, keep what gradient checkpointing saves (each block's input: layers x tokens x hidden x 2 bytes) in
    pinned host RAM between forward and backward: that much less GPU memory, as much more host RAM, twice as many
    bytes over PCIe per micro-batch; gradients unchanged bit for bit. Needs `model.gradient_checkpointing`; no effect
    with `device = "cpu"`, where the activations are in host RAM already
    """

    @property
    def offloads(self) -> bool:
        """Whether activations are offloaded: on a CPU they are in host RAM already (offload_activations is then
        ignored, so a GPU recipe runs unchanged with --set train.device=cpu)."""
        return self.offload_activations and self.device != "cpu"

    def __post_init__(self):
        _positive(self, "max_steps", "micro_batch_size", "grad_accum_steps")
        if self.loss_chunk_tokens < 0:
            raise _rule(self, "loss_chunk_tokens", "must be >= 0 (0 = Hugging Face's own loss)")
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _choice(self, "autocast", ("auto", "bf16", "none"))
        if self.threads < 0:
            raise _rule(self, "threads", "must be >= 0")


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    every: int = 50
    """steps between evaluations; 0 = only at the start and the end"""
    batches: int = 8
    """micro-batches per evaluation"""

    def __post_init__(self):
        if self.every < 0:
            raise _rule(self, "every", "must be >= 0")
        _positive(self, "batches")


@dataclass
class LogConfig:
    """What is written and shown while training."""

    every: int = 10
    """steps between metric records and progress updates"""
    tensorboard: bool = False
    """also write the records as TensorBoard events to `RUN_DIR/tensorboard` (`pip install 'lean-relora[tensorboard]'`)
    """
    wandb: str = ""
    """`"offline"`: also log them to an offline Weights & Biases run in `RUN_DIR/wandb` (`wandb sync` uploads it; `pip
    install 'lean-relora[wandb]'`)
    """

    def __post_init__(self):
        _positive(self, "every")
        _choice(self, "wandb", ("", "offline"))


@dataclass
class CheckpointConfig:
    """When the whole training state is saved to RUN_DIR/checkpoints, and when a diverging run gives up."""

    every: int = 100
    """steps between checkpoints; 0 = only at the end and when SIGINT/SIGTERM stops the run"""
    keep_last: int = 2
    """complete checkpoints kept; older ones are deleted only after a newer one is complete"""
    max_bad_steps: int = 5
    """steps in a row with a NaN/inf loss or gradient that are skipped (no update); one more saves and stops the run"""

    def __post_init__(self):
        if self.every < 0:
            raise _rule(self, "every", "must be >= 0")
        _positive(self, "keep_last")
        if self.max_bad_steps < 0:
            raise _rule(self, "max_bad_steps", "must be >= 0")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    relora: ReloraConfig = field(default_factory=ReloraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.data.tokenizer == "bpe" and self.model.pretrained:
            raise RecipeError(
                "data.tokenizer = 'bpe': a BPE trained on the corpus does not match the vocabulary model.pretrained "
                "was trained on; set data.tokenizer = \"\" for the model's own tokenizer, or name another",
                "data.tokenizer")
        if self.data.seq_len > self.model.max_position_embeddings and not self.model.pretrained:
            raise RecipeError(
                f"data.seq_len = {self.data.seq_len}: must be <= model.max_position_embeddings "
                f"({self.model.max_position_embeddings})", "data.seq_len")
        if self.train.offload_activations and not self.model.gradient_checkpointing:
            raise RecipeError("train.offload_activations = true offloads what gradient checkpointing keeps: set "
                              "model.gradient_checkpointing = true", "train.offload_activations")
        if self.relora.warm_start_steps > self.train.max_steps:
            raise RecipeError(
                f"relora.warm_start_steps = {self.relora.warm_start_steps}: must be <= train.max_steps "
                f"({self.train.max_steps}); "
                "equal trains full-rank throughout", "relora.warm_start_steps")

    @property
    def keeps_master(self) -> bool:
        """Whether each frozen base keeps an fp32 master (relora.fidelity = master), unless the base is exact already
        (lora.quant = none in fp32: a master would only duplicate it)."""
        exact_base = self.lora.quant == "none" and self.model.dtype == "fp32"
        return self.relora.fidelity == "master" and not exact_base

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def changes(self, new: Recipe) -> tuple[list[str], list[str]]:
        """Every field that differs in `new`, as "section.key (old -> new)", split into (those that change what is
        trained, those in RESUME_SAFE): a resumed run refuses the first kind unless forced."""
        refused, allowed, new_dict = [], [], new.to_dict()
        for section, table in self.to_dict().items():
            for key, old in table.items():
                if new_dict[section][key] != old:
                    name = f"{section}.{key}"
                    change = f"{name} ({old!r} -> {new_dict[section][key]!r})"
                    (allowed if name in RESUME_SAFE else refused).append(change)
        return refused, allowed

    def to_toml(self) -> str:
        """The recipe as TOML that load_recipe reads back into an equal Recipe (checkpoints keep this copy)."""
        lines = []
        for section, table in self.to_dict().items():
            lines += [f"[{section}]", *(f"{key} = {_toml_value(value)}" for key, value in table.items()), ""]
        return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr of a float is valid TOML, inf and nan included
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # a JSON string is a TOML basic string


SECTIONS: dict[str, type] = typing.get_type_hints(Recipe)



def _rule(obj, name: str, rule: str) -> RecipeError:
    """A field's rule broken; the key is the field's own name until its section prefixes it (loading.py)."""
    return RecipeError(f"{name} = {getattr(obj, name)!r}: {rule}", key=name)


def _positive(obj, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise _rule(obj, name, "must be > 0")


def _choice(obj, name: str, options: tuple[str, ...]) -> None:
    if getattr(obj, name) not in options:
        raise _rule(obj, name, f"must be one of {', '.join(options)}")
