"""The fastest settings that fit a GPU: `lean-relora memory-estimate RECIPE --gpu-gb N --plan`.

What is searched, with the tokens per optimizer step fixed (micro-batch x gradient accumulation x ranks):
    train.micro_batch_size         the divisors of the recipe's micro_batch_size x grad_accum_steps, up to the first
                                   whose micro-batch reaches SATURATION_TOKENS (larger ones are no faster, below)
    model.gradient_checkpointing   off, on
    train.offload_activations      off, on (only with checkpointing, only for a GPU)
    train.loss_chunk_tokens        0 (Hugging Face's loss, all logits at once), the recipe's chunk (1024 if it
                                   has none), and SMALL_CHUNK where a chunk of the recipe's size holds more than
                                   SMALL_CHUNK_FROM bytes of logits (a vocabulary of 152k: 1.2 GiB per 1024
                                   tokens; of 32k: 0.24 GiB, not worth the traces its near-ties would cost)
    lora.train_lm_head             trains, frozen: searched only for continued pretraining (no full-rank warm start,
                                   untied lm_head), where the pretrained head can stay as it is. Freezing it changes
                                   what is trained, so it is never traded for speed: a frozen head is chosen only
                                   when no candidate that trains it fits.
Everything else stays as the recipe says.

The cost model: relative step time, the run's average time per token over that of the same run with every
activation on the GPU, Hugging Face's loss and a saturating micro-batch (1.00). Per token of one micro-batch of t
tokens:
    compute     F / (PEAK_TFLOPS x MFU x u(t)) seconds, F the FLOPs of forward and backward per token:
                forward 2 N + 4 L h s (N: the weights a token multiplies, L layers of width h, s the sequence length;
                the attention term is the PaLM paper's, arXiv 2204.02311 appendix B); a full-rank step's backward
                is twice that (6 N + 12 L h s in all, Kaplan et al. 2001.08361); a ReLoRA step's frozen base needs
                only the gradients of its inputs (2 N'), plus the weight gradients of the LoRA factors and of
                lm_head when it trains.
    checkpointing   one more forward of every decoder block (2 N_blocks + 4 L h s): +1/3 of a full-rank step,
                about +1/2 of a ReLoRA one, whose backward skips the frozen weights' gradients.
    chunked loss    backward recomputes the logits of every chunk but the last: 2 V h x (t - chunk) / t.
    offloading  2 x the offloaded bytes (memory.offloaded_bytes: the block inputs and what the loss keeps) over PCIe
                at PCIE_GB_S, added to the compute time: offload.py copies on the compute stream, so nothing overlaps.
    micro-batch u(t) = min(t, SATURATION_TOKENS) / (min(t, SATURATION_TOKENS) + HALF_TOKENS), relative to its
                value at SATURATION_TOKENS: a fixed per-micro-batch cost (kernel launches, the dequantization of
                every base weight, the optimizer's share) worth HALF_TOKENS tokens of compute, and matrix products
                whose row count (tokens) fills the GPU from SATURATION_TOKENS on.
The constants describe a 24 GB RTX 4090, the most common card for this; they are stated assumptions, not
measurements of lean-relora (none has been made on a GPU yet). Only their ratios rank candidates: PEAK x MFU against
PCIe bandwidth prices the offloading, HALF_TOKENS and SATURATION_TOKENS the micro-batch.

Every candidate's fit comes from the trace memory-estimate uses (memory.estimate: trace.trace plus the cuBLAS
workspaces, the allocator reserve and the CUDA context, memory.gpu_need). Tracing every candidate would take minutes
for a 7B model (15-30 s a trace on this project's 2-core machine), so candidates are walked fastest first and each
one's GPU need is, per phase of the run:
    traced      a real trace of exactly these settings;
    derived     for settings already traced at another micro-batch m0: that trace plus the analytic model's
                difference between the two micro-batches, T(m0) + A(m) - A(m0) (memory is affine in the
                micro-batch, piecewise where the loss chunk fills: the analytic model carries the shape, the trace
                the level);
    analytic    memory.analytic alone, for settings never traced (within a few % of the trace on the shipped
                recipes; tests/test_memory.py bounds it at 10%).
A candidate whose derived or analytic need is within VERIFY_MARGIN over the budget, or under it, is traced before it
is judged: so the chosen plan is always a real trace, and every candidate ranked faster was ruled out by a real trace
or by an estimate more than VERIFY_MARGIN over the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from lean_relora.memory.analytic import GIB, analytic, recipe_vocab_size, target_shapes, with_model_sizes
from lean_relora.memory.estimate import cublas_workspace_bytes, gpu_need, visible_capability
from lean_relora.memory.host_ram import offloaded_bytes
from lean_relora.memory.trace import trace
from lean_relora.recipe import Recipe, RecipeError

PEAK_TFLOPS = 165.2  # RTX 4090: dense bf16 tensor-core math with fp32 accumulation (NVIDIA Ada Lovelace whitepaper,
# appendix A: 165.2 TFLOP/s, 330.4 with sparsity)
MFU = 0.40  # share of that peak a training step's matrix products reach: an assumption (well-tuned LLaMA training
# reports 40-60% on datacenter GPUs; 4-bit dequantization and small micro-batches cost more on a consumer card)
PCIE_GB_S = 25.0  # GB/s of pinned host<->device copies on PCIe 4.0 x16 (31.5 GB/s per direction raw; ~25 is what
# copies reach, e.g. CUDA's bandwidthTest on such cards)
HALF_TOKENS = 256  # tokens of compute a micro-batch's fixed cost is worth (assumed)
SATURATION_TOKENS = 8192  # tokens per micro-batch from which a larger one is no faster (assumed)
VERIFY_MARGIN = 0.05  # an estimate this far over the budget or less is settled by a real trace
DEFAULT_CHUNK = 1024  # tokens: the loss chunk tried when the recipe has none (train.loss_chunk_tokens's default)
SMALL_CHUNK = 256  # tokens: the smallest loss chunk tried (its matmuls are still 256 rows tall)
SMALL_CHUNK_FROM = 2**29  # bytes of one chunk's fp32 logits and their temporary above which SMALL_CHUNK is tried
FASTER_SHOWN = 6  # faster candidates ruled out that the table shows (the last ones, nearest the chosen)
DESKTOP_GIB = 0.35  # GiB a desktop session keeps on the card that drives it (the 22 GiB of a 24 GB card)


def card_free_gib(card_gb: float) -> float:
    """GiB free on a card sold as `card_gb` GB (10^9 bytes) that also drives a desktop: 24 -> 22.0."""
    return round(card_gb * 1e9 / GIB - DESKTOP_GIB, 1)


@dataclass(frozen=True)
class Settings:
    micro_batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    offload_activations: bool
    loss_chunk_tokens: int
    train_lm_head: bool

    def overrides(self) -> list[str]:
        """`--set` values (without the flag) that make a recipe use these settings."""
        flag = lambda b: "true" if b else "false"  # noqa: E731
        return [f"train.micro_batch_size={self.micro_batch_size}", f"train.grad_accum_steps={self.grad_accum_steps}",
                f"model.gradient_checkpointing={flag(self.gradient_checkpointing)}",
                f"train.offload_activations={flag(self.offload_activations)}",
                f"train.loss_chunk_tokens={self.loss_chunk_tokens}",
                f"lora.train_lm_head={flag(self.train_lm_head)}"]

    def apply(self, recipe: Recipe) -> Recipe:
        return replace(recipe,
                       model=replace(recipe.model, gradient_checkpointing=self.gradient_checkpointing),
                       train=replace(recipe.train, micro_batch_size=self.micro_batch_size,
                                     grad_accum_steps=self.grad_accum_steps,
                                     offload_activations=self.offload_activations,
                                     loss_chunk_tokens=self.loss_chunk_tokens),
                       lora=replace(recipe.lora, train_lm_head=self.train_lm_head))

    def describe(self) -> str:
        memory = ("checkpointing, inputs offloaded" if self.offload_activations else
                  "checkpointing" if self.gradient_checkpointing else "no checkpointing")
        loss = f"loss in chunks of {self.loss_chunk_tokens}" if self.loss_chunk_tokens else "HF loss"
        head = "" if self.train_lm_head else ", lm_head frozen"
        return f"micro-batch {self.micro_batch_size} x {self.grad_accum_steps}, {memory}, {loss}{head}"


@dataclass
class Candidate:
    settings: Settings
    cost: float  # relative step time (module docstring)
    needs: dict[str, float] = field(default_factory=dict)  # bytes by phase name
    sources: dict[str, str] = field(default_factory=dict)  # by phase: traced | derived | analytic
    fits: bool | None = None  # None: not judged (the search stopped before it)

    @property
    def need(self) -> float:
        return max(self.needs.values()) if self.needs else 0.0

    @property
    def source(self) -> str:
        """How the binding phase's need is known."""
        return self.sources[max(self.needs, key=self.needs.get)] if self.needs else "-"


@dataclass
class Plan:
    budget: float  # bytes
    tokens_per_step: int  # sequences per optimizer step and rank
    seq_len: int
    chosen: Candidate | None
    faster: list[Candidate]  # ranked before the chosen one and ruled out, fastest first
    runners_up: list[Candidate]  # the next that fit by their estimates, fastest first
    closest: Candidate | None  # when nothing fits: the candidate that needs least
    traces: int
    seconds: float
    phases: list[str]
    head_searched: bool = False  # whether lora.train_lm_head was searched (continued pretraining)


class _Search:
    def __init__(self, recipe: Recipe, budget: float, nproc: int):
        self.recipe, self.budget, self.nproc = recipe, budget, nproc
        self.vocab = recipe_vocab_size(recipe)
        self.shapes = target_shapes(recipe, self.vocab)
        self.workspaces = cublas_workspace_bytes(visible_capability())
        self.phases = [("ReLoRA", "relora")]
        if recipe.relora.warm_start_steps:
            self.phases.insert(0, ("full-rank warm start", "full"))
        self.analytic_cache: dict = {}
        self.traced: dict = {}  # (phase key, micro-batch) -> traced peak bytes
        self.traces = 0

    # ---- memory

    def _key(self, s: Settings, kind: str) -> tuple:
        return (kind, s.gradient_checkpointing, s.offload_activations, s.loss_chunk_tokens,
                s.train_lm_head if kind == "relora" else None)

    def _analytic(self, s: Settings, kind: str) -> dict[str, int]:
        key = self._key(s, kind) + (s.micro_batch_size,)
        if key not in self.analytic_cache:
            self.analytic_cache[key] = analytic(s.apply(self.recipe), self.vocab, kind)
        return self.analytic_cache[key]

    def _need(self, s: Settings, kind: str, peak: float) -> float:
        buckets = self._analytic(s, kind)["trainable weights"] if self.nproc > 1 else 0
        return gpu_need(peak + buckets + self.workspaces)

    def _trace(self, s: Settings, kind: str) -> float:
        key = (self._key(s, kind), s.micro_batch_size)
        if key not in self.traced:
            self.traced[key] = trace(s.apply(self.recipe), self.vocab, kind).peak
            self.traces += 1
        return self.traced[key]

    def estimate(self, s: Settings, kind: str) -> tuple[float, str]:
        """(bytes needed, how it is known) without tracing anything new."""
        key = self._key(s, kind)
        if (key, s.micro_batch_size) in self.traced:
            return self._need(s, kind, self.traced[(key, s.micro_batch_size)]), "traced"
        anchors = [m for (k, m) in self.traced if k == key]
        total = lambda settings: sum(self._analytic(settings, kind).values())  # noqa: E731
        if anchors:
            m0 = min(anchors, key=lambda m: abs(m - s.micro_batch_size))
            at = replace(s, micro_batch_size=m0)
            return self._need(s, kind, self.traced[(key, m0)] + total(s) - total(at)), "derived"
        return self._need(s, kind, total(s)), "analytic"

    def judge(self, c: Candidate) -> None:
        """Whether the candidate fits, tracing it where its estimate is not conclusive; phases in order, stopping at
        the first that does not fit."""
        c.fits = True
        estimates = {name: self.estimate(c.settings, kind) for name, kind in self.phases}
        # a phase clearly over settles it without a trace
        for name, kind in self.phases:
            need, how = estimates[name]
            if need > self.budget * (1 + VERIFY_MARGIN):
                c.needs, c.sources, c.fits = {name: need}, {name: how}, False
                return
        for name, kind in self.phases:
            need, how = estimates[name]
            if how != "traced":
                self._trace(c.settings, kind)
                need, how = self.estimate(c.settings, kind)
            c.needs[name], c.sources[name] = need, how
            if need > self.budget:
                c.fits = False
                return

    # ---- cost

    def flops_per_token(self, s: Settings, kind: str) -> tuple[float, float]:
        """(FLOPs per token of this candidate's step, of the reference step) for one phase."""
        m = self.recipe.model
        h, layers, seq, vocab = m.hidden_size, m.num_layers, self.recipe.data.seq_len, self.vocab
        blocks = sum(o * i for o, i in self.shapes)
        lora = sum(self.recipe.lora.rank * (o + i) for o, i in self.shapes) if kind == "relora" else 0
        head, attention = vocab * h, 4 * layers * h * seq
        forward = 2 * (blocks + lora + head) + attention
        if kind == "full":
            step = reference = 3 * forward
        else:
            # backward: the inputs' gradients everywhere, the weights' only of the LoRA factors and a training head
            backward = 2 * (blocks + lora + head) + 2 * attention + 2 * lora
            reference = forward + backward + 2 * head
            step = forward + backward + 2 * head * s.train_lm_head
        if s.gradient_checkpointing:
            step += 2 * (blocks + lora) + attention
        tokens = s.micro_batch_size * seq
        if s.loss_chunk_tokens and tokens > s.loss_chunk_tokens:
            step += 2 * head * (tokens - s.loss_chunk_tokens) / tokens
        return step, reference

    def cost(self, s: Settings) -> float:
        rate = PEAK_TFLOPS * 1e12 * MFU
        tokens = s.micro_batch_size * self.recipe.data.seq_len
        use = lambda t: min(t, SATURATION_TOKENS) / (min(t, SATURATION_TOKENS) + HALF_TOKENS)  # noqa: E731
        utilisation = use(tokens) / use(SATURATION_TOKENS)
        warm = self.recipe.relora.warm_start_steps
        weights = {"full": warm, "relora": self.recipe.train.max_steps - warm}
        spent = ideal = 0.0
        for _, kind in self.phases:
            step, reference = self.flops_per_token(s, kind)
            seconds = step / (rate * utilisation)
            if s.offload_activations:
                offloaded = offloaded_bytes(s.apply(self.recipe))
                seconds += 2 * offloaded / tokens / (PCIE_GB_S * 1e9)
            spent += weights[kind] * seconds
            ideal += weights[kind] * reference / rate
        return spent / ideal


def candidates(recipe: Recipe) -> list[Settings]:
    """Every setting the search considers (module docstring), unordered; `recipe` with its model's sizes
    (memory.with_model_sizes)."""
    total = recipe.train.micro_batch_size * recipe.train.grad_accum_steps
    seq = recipe.data.seq_len
    sizes = []
    for d in range(1, total + 1):
        if total % d == 0:
            sizes.append(d)
            if d * seq >= SATURATION_TOKENS:
                break
    memory = [(False, False), (True, False)] + ([(True, True)] if recipe.train.device != "cpu" else [])
    chunk = recipe.train.loss_chunk_tokens or DEFAULT_CHUNK
    large = chunk * recipe_vocab_size(recipe) * (4 + 4) > SMALL_CHUNK_FROM  # as memory.analytic counts a chunk
    chunks = [0, chunk] + ([SMALL_CHUNK] if chunk > SMALL_CHUNK and large else [])
    continued = not recipe.relora.warm_start_steps and not recipe.model.tie_embeddings
    heads = [True, False] if continued else [recipe.lora.train_lm_head]
    return [Settings(b, total // b, ckpt, off, chunk, head)
            for b in sizes for ckpt, off in memory for chunk in chunks for head in heads]


def plan(recipe: Recipe, gpu_gb: float, nproc: int = 1, runners_up: int = 4) -> Plan:
    """The fastest settings (by the cost model) whose every phase fits `gpu_gb` GiB, per GPU of `nproc` ranks."""
    started = time.perf_counter()
    recipe = with_model_sizes(recipe)
    if gpu_gb <= 0:
        raise RecipeError(f"--gpu-gb {gpu_gb:g}: must be > 0")
    search = _Search(recipe, gpu_gb * GIB, nproc)
    # freezing lm_head changes what trains: never traded for speed (module docstring)
    ranked = sorted((Candidate(s, search.cost(s)) for s in candidates(recipe)),
                    key=lambda c: (not c.settings.train_lm_head, c.cost, c.settings.micro_batch_size))
    chosen, faster, after = None, [], []
    for c in ranked:
        if chosen is None:
            search.judge(c)
            if c.fits:
                chosen = c
            else:
                faster.append(c)
        elif len(after) < runners_up:
            needs = {name: search.estimate(c.settings, kind) for name, kind in search.phases}
            c.needs = {name: need for name, (need, _) in needs.items()}
            c.sources = {name: how for name, (_, how) in needs.items()}
            if c.need <= search.budget:
                after.append(c)
    closest = None
    if chosen is None:
        # the leanest settings, traced: what every other candidate needs at least
        lean = min(ranked, key=lambda c: (c.settings.micro_batch_size, not c.settings.gradient_checkpointing,
                                          not c.settings.offload_activations, c.settings.loss_chunk_tokens == 0,
                                          c.settings.loss_chunk_tokens, c.settings.train_lm_head))
        lean.needs, lean.sources = {}, {}
        for name, kind in search.phases:
            search._trace(lean.settings, kind)
            lean.needs[name], lean.sources[name] = search.estimate(lean.settings, kind)
        closest = lean
    return Plan(search.budget, recipe.train.micro_batch_size * recipe.train.grad_accum_steps, recipe.data.seq_len,
                chosen, faster, after, closest, search.traces,
                time.perf_counter() - started, [name for name, _ in search.phases],
                len({c.settings.train_lm_head for c in ranked}) > 1)


def nothing_fits(plan: Plan) -> str:
    c = plan.closest
    return (f"nothing fits in {plan.budget / GIB:.1f} GiB: the closest, {c.settings.describe()}, needs "
            f"{c.need / GIB:.1f} GiB ({(c.need - plan.budget) / GIB:.1f} GiB more, {c.source})")


def render_plan(plan: Plan, recipe_path: str | None):
    """A rich table of the chosen plan, the faster candidates ruled out and the runners-up; and the lines to
    train with the plan."""
    from rich.table import Table

    table = Table(title=f"Plan for {plan.budget / GIB:.1f} GiB of GPU: {plan.tokens_per_step:,} sequences of "
                        f"{plan.seq_len} tokens per optimizer step (and rank), fastest first; {plan.traces} traces, "
                        f"{plan.seconds:.0f} s", title_justify="left")
    for heading in ("", "settings", "GPU need (GiB)", "how known", "relative step time"):
        table.add_column(heading, justify="right" if "GiB" in heading or "time" in heading else "left")
    shown = plan.faster[-FASTER_SHOWN:]
    rows = [("over", c) for c in shown] + ([("chosen", plan.chosen)] if plan.chosen else []) + [
        ("runner-up", c) for c in plan.runners_up]
    if len(plan.faster) > len(shown):
        table.caption = (f"{len(plan.faster) - len(shown)} faster candidates more are over too (--json lists every "
                         "one)")
        table.caption_justify = "left"
    for label, c in rows:
        style = "[bold]" if label == "chosen" else ""
        phases = ", ".join(f"{n.split()[0] if ' ' in n else n} {v / GIB:.2f}" for n, v in c.needs.items())
        table.add_row(f"{style}{label}", f"{style}{c.settings.describe()}", phases, c.source, f"{c.cost:.2f}")
    lines = []
    if plan.chosen:
        sets = [f"--set {o}" for o in plan.chosen.settings.overrides()
                if plan.head_searched or not o.startswith("lora.train_lm_head")]
        lines = sets + [f"lean-relora train {recipe_path or ''} {' '.join(sets)}".replace("  ", " ")]
    return table, lines


def plan_dict(plan: Plan) -> dict:
    """The plan as JSON-ready values (bytes, settings as --set values)."""
    def one(c: Candidate | None):
        return None if c is None else {"settings": c.settings.overrides(), "describe": c.settings.describe(),
                                       "needs": c.needs, "sources": c.sources, "need": c.need,
                                       "relative_step_time": c.cost, "fits": c.fits}

    return {"budget": plan.budget, "tokens_per_step": plan.tokens_per_step, "seq_len": plan.seq_len,
            "phases": plan.phases, "chosen": one(plan.chosen), "faster": [one(c) for c in plan.faster],
            "runners_up": [one(c) for c in plan.runners_up], "closest": one(plan.closest), "traces": plan.traces,
            "seconds": plan.seconds}
