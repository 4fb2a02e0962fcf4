"""A recipe: one TOML file, one typed dataclass per section, every field with its unit.

Bad input never reaches the trainer as a traceback: `load_recipe` raises `RecipeError` with one line naming the
file, the key, the value and the rule, and the CLI turns that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

QUANT_TYPES = ("nf4", "fp4", "int8", "none")
OPTIMIZERS = ("paged_adamw8bit", "adamw8bit", "adamw")
RESETS = ("magnitude", "random", "zero")
INITS = ("random", "gradient")
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
    """A recipe the trainer cannot run; the message is one line meant for the user."""


@dataclass
class ModelConfig:
    """The network: a local/hub pretrained model, or a LLaMA built from the sizes below."""

    pretrained: str = ""  # local directory or hub name; empty = build from the sizes below (random init)
    vocab_size: int = 0  # embedding rows, in tokens; 0 = the tokenizer's size (set it to estimate memory offline)
    hidden_size: int = 256  # width of the residual stream, in features
    intermediate_size: int = 688  # MLP width, in features
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 0  # key/value heads for grouped-query attention; 0 = num_heads
    max_position_embeddings: int = 2048  # longest sequence the model accepts, in tokens
    tie_embeddings: bool = False  # share the input embedding with lm_head
    dtype: str = "bf16"  # storage dtype of trainable full-rank weights and LoRA factors: bf16 | fp32
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory

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

    source: str = "pydoc"  # "pydoc" (CPython's bundled docs), a file/dir/glob of .txt/.jsonl/.json/.parquet (one .txt file: documents split at blank lines; several: one per file), "hub:NAME" (streamed), or "prepared:DIR" (token files written by `lean-relora prepare`)
    hub_config: str = ""  # configuration name of a hub dataset (e.g. "en" for allenai/c4)
    split: str = "train"  # split of a hub dataset
    text_column: str = "text"  # column holding the documents in jsonl/parquet/hub data
    tokenizer: str = ""  # "" = the model's own (model.pretrained), from scratch "bpe"; "bpe" = train a byte-level BPE on the corpus; else a local dir / hub name (copied into the run dir either way)
    bpe_vocab_size: int = 4096  # vocabulary of the trained BPE tokenizer, in tokens
    seq_len: int = 128  # tokens per training block
    eval_fraction: float = 0.05  # share of documents held out for evaluation (local data)
    eval_documents: int = 200  # documents held out for evaluation (streaming hub data)
    shuffle_seed: int = 0  # seed of the document and block shuffle
    max_documents: int = 0  # read at most this many documents; 0 = all
    document_mask: bool = False  # true: attention and position ids restart at each document of a packed block (a block-diagonal mask, slower); false: causal over the whole block

    def __post_init__(self):
        _positive(self, "seq_len", "bpe_vocab_size", "eval_documents")
        if not 0.0 < self.eval_fraction < 1.0:
            raise _rule(self, "eval_fraction", "must be in (0, 1)")
        if self.max_documents < 0:
            raise _rule(self, "max_documents", "must be >= 0")


@dataclass
class LoraConfig:
    """The low-rank factors and the frozen base they sit on."""

    rank: int = 8  # r: inner dimension of B (out x r) @ A (r x in)
    alpha: float = 16.0  # LoRA output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the LoRA branch input, probability
    targets: list[str] = field(default_factory=list)  # nn.Linear/Conv1D modules of the decoder blocks to wrap: names or regexes matched against the last part of the module name; [] = all of them
    quant: str = "nf4"  # frozen base storage: nf4 | fp4 (bnb 4-bit) | int8 (bnb row-wise) | none (frozen bf16/fp32)
    blocksize: int = 64  # 4-bit quantization block, in elements
    double_quant: bool = True  # quantize the 4-bit absmax statistics again (saves ~0.4 bit/param)
    train_embeddings: bool = True  # embeddings stay trainable full-rank (as in the paper)
    train_norms: bool = True  # norm weights stay trainable full-rank
    train_lm_head: bool = True  # lm_head stays trainable full-rank

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

    restart_every: int = 100  # steps per ReLoRA cycle (merge at each multiple, counted after the warm start)
    restart_warmup_steps: int = 10  # steps of linear LR re-warm after each restart
    warm_start_steps: int = 0  # full-rank steps (dense, all trainable) before ReLoRA begins; = train.max_steps: a full-rank baseline
    reset: str = "magnitude"  # optimizer reset of LoRA states at restart: magnitude | random | zero
    reset_ratio: float = 0.999  # share of each LoRA moment pruned to zero at a restart (magnitude/random)
    fidelity: str = "master"  # how merges survive requantization: master (fp32 copy off the GPU) | naive
    master: str = "ram"  # where the fp32 masters live: ram (host RAM, 4 bytes/weight) | disk (RUN_DIR/master, memory-mapped: host RAM holds one layer during a merge)
    check_ranks: bool = False  # with several ranks (torchrun): after each merge compare every stored base across the ranks by sha256 and stop on a difference (a debug check; copies each base to host RAM once per restart)
    init: str = "random"  # each cycle's A: random (Kaiming-uniform) | gradient (top-r right singular vectors of the layer's weight gradient, at every restart and when ReLoRA follows a warm start; gradinit.py)
    init_batches: int = 4  # micro-batches of the data order the gradient init consumes; each goes forward/backward twice, counted in the run's tokens

    def __post_init__(self):
        _positive(self, "restart_every")
        _choice(self, "reset", RESETS)
        _choice(self, "fidelity", FIDELITIES)
        _choice(self, "master", MASTER_STORES)
        _choice(self, "init", INITS)
        _positive(self, "init_batches")
        if self.restart_warmup_steps < 0 or self.warm_start_steps < 0:
            raise _rule(self, "restart_warmup_steps", "must be >= 0")
        if self.restart_warmup_steps >= self.restart_every:
            raise _rule(self, "restart_every", f"must be longer than relora.restart_warmup_steps ({self.restart_warmup_steps})")
        if not 0.0 <= self.reset_ratio < 1.0:
            raise _rule(self, "reset_ratio", "must be in [0, 1)")


@dataclass
class OptimConfig:
    """The optimizer and the global jagged-cosine learning rate."""

    name: str = "paged_adamw8bit"  # paged_adamw8bit | adamw8bit | adamw (32-bit)
    lr: float = 1e-3  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam beta1, beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay on matrices (norms and biases get none)
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping
    warmup_steps: int = 10  # steps of the first linear warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps

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

    max_steps: int = 200  # optimizer steps in the whole run (warm start included)
    micro_batch_size: int = 8  # sequences per forward/backward
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0  # seed for model init, LoRA init and dropout
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    autocast: str = "auto"  # bf16 autocast: auto (on CUDA with bf16 support) | bf16 | none
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    loss_chunk_tokens: int = 1024  # tokens whose logits the loss holds at once (recomputed in backward); 0 = HF's loss, all logits
    # On a GPU, keep what gradient checkpointing saves (each block's input, layers x tokens x hidden x 2 bytes) in
    # pinned host RAM between forward and backward: that much less GPU memory, as much more host RAM, and twice
    # that many bytes over PCIe per micro-batch (offload.py)
    offload_activations: bool = False

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

    every: int = 50  # steps between evaluations; 0 = only at the start and the end
    batches: int = 8  # micro-batches per evaluation

    def __post_init__(self):
        if self.every < 0:
            raise _rule(self, "every", "must be >= 0")
        _positive(self, "batches")


@dataclass
class LogConfig:
    """What is written and shown while training."""

    every: int = 10  # steps between metric lines in metrics.jsonl and progress updates
    tensorboard: bool = False  # also write the metrics as TensorBoard events to RUN_DIR/tensorboard (extra: lean-relora[tensorboard])
    wandb: str = ""  # "offline": also log to a Weights & Biases offline run in RUN_DIR/wandb (extra: lean-relora[wandb]); "" = off

    def __post_init__(self):
        _positive(self, "every")
        _choice(self, "wandb", ("", "offline"))


@dataclass
class CheckpointConfig:
    """When the whole training state is saved to RUN_DIR/checkpoints, and when a diverging run gives up."""

    every: int = 100  # steps between checkpoints; 0 = only at the end and when SIGINT/SIGTERM stops the run
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted only after a newer one is complete
    max_bad_steps: int = 5  # steps in a row with a NaN/inf loss or gradient that are skipped (no update); one more stops the run with a checkpoint

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
                "was trained on; set data.tokenizer = \"\" for the model's own tokenizer, or name another"
            )
        if self.data.seq_len > self.model.max_position_embeddings and not self.model.pretrained:
            raise RecipeError(
                f"data.seq_len = {self.data.seq_len}: must be <= model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        if self.train.offload_activations and not self.model.gradient_checkpointing:
            raise RecipeError("train.offload_activations = true offloads what gradient checkpointing keeps: set "
                              "model.gradient_checkpointing = true")
        if self.relora.warm_start_steps > self.train.max_steps:
            raise RecipeError(
                f"relora.warm_start_steps = {self.relora.warm_start_steps}: must be <= train.max_steps ({self.train.max_steps}); "
                "equal trains full-rank throughout"
            )

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


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a TOML recipe (None = the embedded default) and apply `section.key=value` overrides. An error about an
    overridden key names its --set rather than the file."""
    path = Path(path) if path else default_recipe_path()
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such recipe file; pass an existing .toml path or omit it for the default")
    except IsADirectoryError:
        raise RecipeError(f"{where}: is a directory; pass a recipe .toml file or omit it for the default") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: is not UTF-8 text; pass a recipe .toml file") from None
    except OSError as e:
        raise RecipeError(f"{where}: cannot be read ({e.strerror}); pass a readable recipe .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{where}: not valid TOML ({e}); fix the syntax at that line")
    origins = {}
    for item in overrides:
        origins[_apply_override(raw, item)] = f"--set {item}"
    return recipe_from_dict(raw, where, origins)


def recipe_from_dict(raw: dict, where: str = "recipe", origins: dict[str, str] | None = None) -> Recipe:
    """`origins` maps "section.key" to where its value came from when not from `where` (a --set)."""
    origins = origins or {}
    sections = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            source = next((o for k, o in origins.items() if k.startswith(f"{name}.")), where)
            raise RecipeError(f"{source}: unknown section [{name}]{_did_you_mean(name, SECTIONS)}")
        if not isinstance(table, dict):
            raise RecipeError(f"{where}: {name} must be a [{name}] table, got {table!r}")
        sections[name] = _build_section(SECTIONS[name], name, table, where, origins)
    try:
        return Recipe(**sections)
    except RecipeError as e:  # a cross-field rule: its message starts with the key it names
        raise RecipeError(f"{origins.get(str(e).split(' = ')[0], where)}: {e}") from None


def default_recipe_path() -> Path:
    # A wheel carries recipes/ inside the package; a source checkout (editable install) has it beside the package.
    packaged = Path(__file__).parent / "recipes" / "tiny_cpu.toml"
    return packaged if packaged.exists() else Path(__file__).parent.parent / "recipes" / "tiny_cpu.toml"


def _build_section(cls, section: str, table: dict, where: str, origins: dict[str, str]):
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        source = origins.get(f"{section}.{key}", where)
        if key not in hints:
            raise RecipeError(f"{source}: unknown key {section}.{key}{_did_you_mean(key, hints)}")
        if not _type_ok(value, hints[key]):
            raise RecipeError(
                f"{source}: {section}.{key} = {value!r}: must be {_type_name(hints[key])}, got {type(value).__name__}"
            )
    try:
        return cls(**{k: float(v) if hints[k] is float else v for k, v in table.items()})
    except RecipeError as e:  # a field's rule: its message starts with the field's name (see _rule)
        key = f"{section}.{str(e).split(' = ')[0]}"
        raise RecipeError(f"{origins.get(key, where)}: {section}.{e}") from None


def _type_ok(value, hint) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return False


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return {str: "a list of strings", float: "a list of numbers"}[typing.get_args(hint)[0]]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _apply_override(raw: dict, item: str) -> str:
    """Set the value in `raw`; returns the key it set ("section.key")."""
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. --set lora.rank=16")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word is a string: --set data.source=corpus.txt
    raw.setdefault(section, {})[name] = value
    return f"{section}.{name}"


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(options)}"


def _rule(obj, name: str, rule: str) -> RecipeError:
    return RecipeError(f"{name} = {getattr(obj, name)!r}: {rule}")


def _positive(obj, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise _rule(obj, name, "must be > 0")


def _choice(obj, name: str, options: tuple[str, ...]) -> None:
    if getattr(obj, name) not in options:
        raise _rule(obj, name, f"must be one of {', '.join(options)}")
