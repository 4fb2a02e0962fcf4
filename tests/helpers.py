"""What the tests share: the one tiny-recipe factory, small recipes for the memory model, the CLI runner, corpora
and tensors. Fixtures live in conftest.py; tiny pretrained architectures in tiny_models.py."""

import json
import shutil
from contextlib import nullcontext

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lean_relora.cli.app import app
from lean_relora.model.build import enable_checkpointing
from lean_relora.model.loss import causal_lm_loss
from lean_relora.recipe import (
    DataConfig,
    EvalConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    ReloraConfig,
    TrainConfig,
)

BATCH, SEQ, HIDDEN, LAYERS = 2, 32, 64, 3  # checkpointed_llama's micro-batch and shape


def tiny_model(**changes) -> ModelConfig:
    """The tests' LLaMA: two blocks of width 64, trained in a second on a CPU."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_position_embeddings=64,
                 dtype="fp32")
    return ModelConfig(**{**sizes, **changes})


def small_model(**changes) -> ModelConfig:
    """Width 128: every matrix above bnb's 4096-element threshold for 8-bit optimizer state, for memory tests."""
    return tiny_model(**{"hidden_size": 128, "intermediate_size": 344, "max_position_embeddings": 128, **changes})


def tiny_recipe(quant="nf4", steps=20, warm_start=0, restart_every=7, **train_kw) -> Recipe:
    return Recipe(
        model=tiny_model(),
        data=DataConfig(source="pydoc", bpe_vocab_size=512, seq_len=32, eval_fraction=0.1),
        lora=LoraConfig(rank=8, alpha=16, quant=quant),
        relora=ReloraConfig(restart_every=restart_every, restart_warmup_steps=2, warm_start_steps=warm_start,
                            reset_ratio=0.9),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(**{"max_steps": steps, "micro_batch_size": 8, "device": "cpu", **train_kw}),
        eval=EvalConfig(every=0, batches=4),
        log=LogConfig(every=1),
    )


def run_dir(tmp_path, tokenizer_cache):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for item in tokenizer_cache.iterdir():
        if item.name.startswith("tokenizer"):
            (shutil.copytree if item.is_dir() else shutil.copy)(item, tmp_path / item.name)
    return tmp_path


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


TINY = """
[model]
hidden_size = 64
intermediate_size = 128
num_layers = 2
num_heads = 4
max_position_embeddings = 64
dtype = "fp32"
[data]
bpe_vocab_size = 512
seq_len = 32
[lora]
rank = 4
[relora]
restart_every = 3
restart_warmup_steps = 1
[optim]
lr = 3e-3
warmup_steps = 1
[train]
max_steps = 7
micro_batch_size = 4
device = "cpu"
[eval]
every = 3
batches = 2
[log]
every = 1
"""


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


SMALL_VOCAB = 512


def small(quant="nf4", rank=8, checkpointing=False, dtype="fp32", accum=1, micro_batch=4, warm_start=0,
          loss_chunk=1024, frozen_embeddings=False):
    return Recipe(
        model=small_model(dtype=dtype, gradient_checkpointing=checkpointing, vocab_size=SMALL_VOCAB),
        data=DataConfig(seq_len=64),
        lora=LoraConfig(rank=rank, quant=quant, train_embeddings=not frozen_embeddings,
                        train_lm_head=not frozen_embeddings),
        relora=ReloraConfig(warm_start_steps=warm_start),
        optim=OptimConfig(),
        train=TrainConfig(micro_batch_size=micro_batch, grad_accum_steps=accum, device="cpu", autocast="none",
                          loss_chunk_tokens=loss_chunk),
    )


SMALL_RECIPES = {
    "nf4 r8": small(),
    "int8 r16": small(quant="int8", rank=16),
    "fp4 r4 mb8": small(quant="fp4", rank=4, micro_batch=8),
    "none ckpt": small(quant="none", checkpointing=True),
    "nf4 ckpt accum": small(checkpointing=True, accum=2),
    "nf4 bf16": small(dtype="bf16"),
    "nf4 loss in chunks of 64": small(loss_chunk=64),
    "nf4 ckpt HF loss": small(checkpointing=True, loss_chunk=0),
}


QUANTS = ["nf4", "fp4", "int8", "none"]


# Max |error| of y = x W^T relative to max |y|, per format, for W ~ N(0, 0.02): 4-bit has ~16 levels per block.
TOLERANCE = {"nf4": 0.15, "fp4": 0.2, "int8": 0.02, "none": 1e-6}


def weight(out_features=64, in_features=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.02


def write_jsonl(path, docs, column="text", **extra):
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({column: doc, **{k: v for k, v in extra.items()}, "id": i}) + "\n")
    return path


def marker_docs(n):
    # "<dN>" appears only in document N, so a decoded block tells which documents it was cut from.
    return [" ".join(f"<d{i}> word{j % 7}" for j in range(12)) for i in range(n)]


def texts(ds) -> list[str]:
    return list(ds["text"])  # a Dataset column is a lazy Column object, not a list


def expected_stream(tok, docs):
    ids = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


PRETRAINED_RECIPE = """
[model]
dtype = "fp32"
[data]
seq_len = 16
[lora]
rank = 4
quant = "none"
[relora]
restart_every = 2
restart_warmup_steps = 0
[optim]
lr = 1e-2
warmup_steps = 0
[train]
max_steps = 4
micro_batch_size = 2
device = "cpu"
[eval]
every = 0
batches = 1
[log]
every = 1
[checkpoint]
every = 2
keep_last = 3
"""


def train_pretrained(recipe, model_dir, run_dir, *args):
    code, output = invoke("train", recipe, "--run-dir", run_dir, "--set", f"model.pretrained='{model_dir}'", *args)
    assert code == 0, output
    return output


# The CLI in a subprocess whose network is made unreachable: the hub endpoint is a closed local port, or the
# machine is declared offline; the hub cache is an empty directory. Each command's clock starts after the imports
# (torch, bitsandbytes and transformers take seconds to import on a busy machine, whatever the model).
TIMED_CLI = """
import contextlib, io, json, logging, sys, time
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # as the CLI does: bnb's import warning is not ours
import lean_relora.memory.estimate, lean_relora.training.loop
from lean_relora.cli.app import main
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv, stdout, stderr, started = ["lean-relora", *argv], io.StringIO(), io.StringIO(), time.perf_counter()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main()
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                    "seconds": time.perf_counter() - started})
print(json.dumps(results))
"""


def checkpointed_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    enable_checkpointing(model)
    return model.train()


def gradients(model, ids, hooks=None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with hooks or nullcontext():
        loss = causal_lm_loss(model, ids, chunk_tokens=16)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


# (TOML body, expected message after "<file>: "). Each is one kind of mistake a user makes.
MALFORMED = [
    ("[modle]\nhidden_size = 8\n", "unknown section [modle]; did you mean 'model'?"),
    ("[lora]\nrnak = 8\n", "unknown key lora.rnak; did you mean 'rank'?"),
    ('[lora]\nrank = "8"\n', "lora.rank = '8': must be an integer, got str"),
    ("[lora]\nrank = true\n", "lora.rank = True: must be an integer, got bool"),
    ("[lora]\nrank = 0\n", "lora.rank = 0: must be > 0"),
    ('[lora]\nquant = "nf3"\n', "lora.quant = 'nf3': must be one of nf4, fp4, int8, none"),
    ("[relora]\nreset_ratio = 1.0\n", "relora.reset_ratio = 1.0: must be in [0, 1)"),
    ("[relora]\nrestart_every = 50\nrestart_warmup_steps = 100\n",
     "relora.restart_every = 50: must be longer than relora.restart_warmup_steps (100)"),
    ("[data]\nseq_len = 4096\n[model]\nmax_position_embeddings = 2048\n",
     "data.seq_len = 4096: must be <= model.max_position_embeddings (2048)"),
    ("[optim]\nbetas = [0.9]\n", "optim.betas = [0.9]: must be two numbers in [0, 1)"),
    ("[lora]\ntargets = [1, 2]\n", "lora.targets = [1, 2]: must be a list of strings, got list"),
    ("lora = 3\n", "lora must be a [lora] table, got 3"),
    ("[train]\nmax_steps = 10\n[relora]\nwarm_start_steps = 11\n",
     "relora.warm_start_steps = 11: must be <= train.max_steps (10); equal trains full-rank throughout"),
    ("[model]\nhidden_size = 100\nnum_heads = 3\n", "model.hidden_size = 100: must be divisible by model.num_heads"),
]


def cuda_recipe(steps: int = 12) -> Recipe:
    return Recipe(
        model=small_model(dtype="bf16"),
        data=DataConfig(source="pydoc", bpe_vocab_size=512, seq_len=64, eval_fraction=0.1),
        lora=LoraConfig(rank=8, quant="nf4"),
        relora=ReloraConfig(restart_every=4, restart_warmup_steps=1, warm_start_steps=2),
        optim=OptimConfig(warmup_steps=2),
        train=TrainConfig(max_steps=steps, micro_batch_size=4, device="cuda"),
        eval=EvalConfig(every=0, batches=2),
        log=LogConfig(every=1),
    )
