"""Train a causal language model under a plan, from scratch or from a checkpoint (``method: lm``).

    from sparseattn.lm.train import LMConfig, train_lm
    result = train_lm(LMConfig(task="books", plan="all: global_tokens(4) | neighbour(128)", epochs=2),
                      out_dir="out/lm", save_model=True)
    result["metrics"]["perplexity"], result["sparsity"]["overall"]

From scratch (``model: null``) the model is a Llama (``layers`` x ``hidden``, ``heads`` heads, positions =
the context) over a byte-level BPE tokenizer trained on the corpus' train split (``bpe_tokenizer``, cached);
from a checkpoint (a hub id or folder) it is that model with its tokenizer. The train split's documents, end
to end with EOS between them, are cut into rows of ``max_length`` tokens (the context); each epoch visits them
in a seeded order and ends with the perplexity of the evaluation split's rows (each row read alone). The
recipe is the training core's (``training.loop``): AdamW without decay on norms and biases, linear warmup and
decay, bf16 autocast on CUDA, gradient clipping, losses kept on the device. The results record has the
shape of ``finetune``'s (``results.json``), with perplexity as the main metric (lower is better).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..integrations.hf import sparsify, unsparsify
from ..models import load_model, load_tokenizer, resolve_model, text_config
from ..plans.io import as_plan, save_plan
from ..plans.plan import Plan
from ..training.config import FinetuneConfig
from ..training.data import subset
from ..training.distributed import Distributed
from ..training.distributed import from_env as distributed_from_env
from ..training.glue import get_task
from ..training.loop import History, resolve_device, resolve_precision, set_seed, train_epochs
from ..training.methods import Method, register_method
from ..training.record import device_description, loss_curve, package_versions, write_results
from .corpus import bpe_tokenizer, corpus_dir, corpus_files, cut_rows, encode_documents
from .perplexity import check_context, check_plan_for_lm, check_plan_length, plan_sparsity, rows_score

__all__ = ["LMConfig", "train_lm", "load_lm_data", "build_lm", "llama_config"]


@dataclass
class LMConfig(FinetuneConfig):
    """What a language-model training run does. ``task`` names the corpus (a folder, see ``corpus_dir``);
    ``max_length`` is the context (tokens a row); ``limit_train`` / ``limit_eval`` count rows."""

    task: str = "books"
    max_length: int = 1024
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 16
    warmup: float = 0.05
    weight_decay: float = 0.1
    eval_split: str = "valid"
    layers: int = 6  # from scratch: the Llama's shape (a checkpoint has its own)
    hidden: int = 384
    heads: int = 6
    intermediate: int | None = None  # None: 8/3 x hidden, rounded up to a multiple of 64
    vocab_size: int = 8192  # of the BPE tokenizer trained on the corpus' train split (from scratch)
    tokenizer: str | None = None  # None: that BPE tokenizer (from scratch) or the checkpoint's own
    method: str = "lm"

    method_name = "lm"

    @staticmethod
    def canonical_task(task: str) -> str:
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"task names a text corpus (e.g. 'books'), got {task!r}")
        try:
            get_task(task)
        except ValueError:
            return task.strip()
        raise ValueError(f"{task!r} is a GLUE task; a language-model run's task names a text corpus (e.g. 'books')")

    def check_eval_split(self) -> None:
        if self.eval_split not in ("valid", "test", "train"):
            raise ValueError(f"eval_split of a corpus is valid, test or train, got {self.eval_split!r}")

    def __post_init__(self):
        super().__post_init__()
        for name in ("layers", "hidden", "heads", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.max_length < 2:
            raise ValueError(f"max_length (the context) must be at least 2 tokens, got {self.max_length}")

    def shape(self, shape_of=None) -> tuple[int, int, int | None]:
        if self.model is None:  # a Llama made from scratch: this config's shape, as many positions as the context
            return self.layers, self.heads, self.max_length
        return super().shape(shape_of)

    def lm_options(self) -> dict:
        """The fields a plain ``lm`` run shares with this config (a method's own options left out)."""
        return {f: getattr(self, f) for f in LMConfig.__dataclass_fields__ if f not in ("method", "plan_digest")}


# -- data -------------------------------------------------------------------------------------------
@dataclass
class LMData:
    tokenizer: object
    train: torch.Tensor  # (N, L) int64 rows
    evals: torch.Tensor
    root: Path
    train_tokens: int
    eval_tokens: int


_ENCODED: dict = {}  # (files, tokenizer) -> documents: a sweep's runs tokenize each split once per process


def _documents(tokenizer, files, tok_key):
    key = (tuple(map(str, files)), tok_key)
    if key not in _ENCODED:
        _ENCODED[key] = encode_documents(tokenizer, files)
    return _ENCODED[key]


def load_tokenizer_for(cfg: LMConfig, root: Path):
    """The run's tokenizer: ``cfg.tokenizer``, else the checkpoint's, else BPE trained on the train split."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer), f"tokenizer {cfg.tokenizer}"
    if cfg.model is not None:
        return load_tokenizer(cfg.model), f"tokenizer of {cfg.model}"
    files = corpus_files(root, "train")
    return bpe_tokenizer(files, cfg.vocab_size), f"bpe{cfg.vocab_size} on {root / 'train'}"


def load_lm_data(cfg: LMConfig, glue_dir=None) -> LMData:
    """The train and evaluation rows of the run's corpus (subsets per limit_train / limit_eval)."""
    root = corpus_dir(cfg.task, glue_dir)
    tokenizer, tok_key = load_tokenizer_for(cfg, root)
    sep = tokenizer.eos_token_id
    rows = {}
    tokens = {}
    for split, limit in (("train", cfg.limit_train), (cfg.eval_split, cfg.limit_eval)):
        docs = _documents(tokenizer, corpus_files(root, split), tok_key)
        r = cut_rows(docs, cfg.max_length, sep)
        rows[split] = r[torch.from_numpy(subset(len(r), limit))]
        tokens[split] = int(sum(len(d) for d in docs))
    return LMData(tokenizer, rows["train"], rows[cfg.eval_split], root, tokens["train"], tokens[cfg.eval_split])


# -- model ------------------------------------------------------------------------------------------
def llama_config(cfg: LMConfig, vocab_size: int, special_id: int | None):
    from transformers import LlamaConfig

    inter = cfg.intermediate or -(-(8 * cfg.hidden // 3) // 64) * 64
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, intermediate_size=inter,
                       max_position_embeddings=cfg.max_length, tie_word_embeddings=True, bos_token_id=special_id,
                       eos_token_id=special_id, pad_token_id=special_id, attn_implementation="sdpa")


def build_lm(cfg: LMConfig, tokenizer, plan: Plan, device) -> torch.nn.Module:
    """The seeded model (new, or the checkpoint in fp32), checked against the context and the plan,
    sparsified under the plan unless it is dense, on ``device``."""
    set_seed(cfg.seed)
    if cfg.model is None:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(llama_config(cfg, len(tokenizer), tokenizer.eos_token_id))
    else:
        model = load_model(cfg.model, task="causal-lm", dtype=torch.float32)
    check_context(model, cfg.max_length, what=resolve_model(cfg.model) if cfg.model else "the model")
    tc = text_config(model)
    check_plan_length(plan, cfg.max_length, tc.num_hidden_layers, tc.num_attention_heads, what=f"plan {cfg.plan}")
    if plan.rules:
        sparsify(model, plan, backend=cfg.backend)
    return model.to(device)


# -- training ---------------------------------------------------------------------------------------
def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, L) rows, in fp32."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train(cfg: LMConfig, model, data: LMData, device: torch.device, precision: str, *, progress: bool = True,
          dist: Distributed | None = None) -> History:
    """``cfg.epochs`` epochs over the train rows, each followed by the evaluation rows' perplexity.

    Data-parallel (``dist.active``, under torchrun): ``cfg.batch_size`` rows per rank, each step's global batch
    the ``batch_size x world_size`` rows one process would draw, each rank training on its slice through
    DistributedDataParallel; losses averaged over the ranks; every rank scores every evaluation row."""
    n = len(data.train)

    def draw(rng, global_batch):
        order = rng.permutation(n)  # the same on every rank: one seed
        return [order[i:i + global_batch] for i in range(0, n, global_batch)]

    def step_loss(net, idx, autocast):
        ids = data.train[torch.from_numpy(idx)]
        ids = (ids.pin_memory() if device.type == "cuda" else ids).to(device, non_blocking=True)
        with autocast():
            return lm_loss(net, ids)

    def evaluation(autocast):
        scored = rows_score(model, data.evals, batch_size=cfg.batch_size, autocast=autocast)
        return {"perplexity": scored.perplexity, "loss": scored.loss}

    return train_epochs(model, cfg, examples=n, draw=draw, step_loss=step_loss, evaluate=evaluation,
                        describe=lambda m: f"{cfg.eval_split} perplexity {m['perplexity']:.3f}", label=cfg.task,
                        precision=precision, device=device, dist=dist or Distributed(), progress=progress)


def save_lm(model, tokenizer, plan: Plan, out_dir: Path, *, sparsified: bool) -> None:
    """The trained model (its own attention again) with its tokenizer under out_dir/model, the plan under
    out_dir/plan."""
    if sparsified:
        unsparsify(model)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    tc = text_config(model)
    save_plan(plan, out_dir / "plan", num_layers=tc.num_hidden_layers, num_heads=tc.num_attention_heads,
              length=None)


def train_lm(cfg: LMConfig, *, glue_dir=None, out_dir=None, device=None, progress: bool = True,
             save_model: bool = False) -> dict:
    """Train one language model under the run's plan; returns its results (also out_dir/results.json).

    Under torchrun (``training.distributed``) data-parallel: rank 0 makes the tokenizer first (the others load
    it), every rank trains on its slice of each global batch, rank 0 alone writes."""
    t_start = time.perf_counter()
    dist = distributed_from_env()
    device = resolve_device(dist.device(device))
    precision = resolve_precision(cfg.precision, device)
    plan = as_plan(cfg.plan)
    check_plan_for_lm(plan)
    with dist.joined(device):
        return _train_lm(cfg, dist, device, precision, plan, t_start, glue_dir=glue_dir, out_dir=out_dir,
                         progress=progress and dist.is_main, save_model=save_model)


def _train_lm(cfg: LMConfig, dist: Distributed, device, precision: str, plan: Plan, t_start: float, *, glue_dir,
              out_dir, progress: bool, save_model: bool) -> dict:
    t0 = time.perf_counter()
    with dist.main_first():  # a tokenizer trained on the corpus is made once, by rank 0, and cached
        data = load_lm_data(cfg, glue_dir)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = build_lm(cfg, data.tokenizer, plan, device)
    t_model = time.perf_counter() - t0
    hist = train(cfg, model, data, device, precision, progress=progress, dist=dist)
    tc = text_config(model)
    sparsity = plan_sparsity(plan, tc.num_hidden_layers, tc.num_attention_heads, {cfg.max_length: len(data.evals)})
    last = hist.epochs[-1]["metrics"]
    params = sum(p.numel() for p in model.parameters())
    result = {
        "config": cfg.to_dict(),
        "task": cfg.task,
        "plan": plan.spec(),
        "plan_name": plan.name,
        "model": resolve_model(cfg.model) if cfg.model else f"llama (new): {cfg.layers} layers, hidden {cfg.hidden}, "
                                                            f"{cfg.heads} heads",
        "parameters": params,
        "main_metric": "perplexity",
        "metrics": last,
        "score": last["perplexity"],
        "epochs": hist.epochs,
        "train_loss_curve": loss_curve(hist.losses),
        "sparsity": sparsity.to_dict(),
        "data": {
            "source": str(data.root), "context": cfg.max_length, "train_rows": len(data.train),
            "eval_rows": len(data.evals), "eval_split": cfg.eval_split, "train_tokens": data.train_tokens,
            "eval_tokens": data.eval_tokens, "vocab_size": len(data.tokenizer),
            "eval_scored_tokens": len(data.evals) * (cfg.max_length - 1),
        },
        "timing": {
            "data_seconds": t_data, "model_seconds": t_model, "train_seconds": hist.train_seconds,
            "eval_seconds": hist.eval_seconds,
            "train_tokens_per_second": len(data.train) * cfg.max_length * cfg.epochs / max(hist.train_seconds, 1e-9),
        },
        "precision": precision,
        "device": device_description(device),
        "versions": package_versions(),
    }
    if dist.active:  # a data-parallel run says so; a single process's record is as it always was
        result["distributed"] = {**dist.to_dict(), "per_rank_batch_size": cfg.batch_size,
                                 "global_batch_size": cfg.batch_size * dist.world_size}
    result["timing"]["total_seconds"] = time.perf_counter() - t_start
    if out_dir is not None and dist.is_main:  # rank 0 alone writes
        write_results(result, out_dir)
        if save_model:
            save_lm(model, data.tokenizer, plan, Path(out_dir), sparsified=bool(plan.rules))
    dist.barrier()  # no rank returns before the results are written
    return result


register_method(Method("lm", LMConfig, train_lm))
