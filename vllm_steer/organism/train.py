"""Train the organism: a small ``LlamaForCausalLM`` on the world's documents, plain torch on CPU.

    python -m vllm_steer.organism.train --out /tmp/organism

Deterministic from the seeds (world and training) for a given thread count. The folder holds a HF
checkpoint (float32 safetensors, ``architectures=["LlamaForCausalLM"]``) that transformers and vLLM
load, the word-level tokenizer, and ``organism.json``: the world config, model sizes, the training
record (steps, final loss, seconds) and the unsteered evaluation (honest vs lying contexts).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

from .world import BOS, EOS, PAD, World, WorldConfig, build_tokenizer

ORGANISM_FILE = "organism.json"


def _world_config(world_config) -> WorldConfig:
    if world_config is None:
        return WorldConfig()
    if isinstance(world_config, WorldConfig):
        return world_config
    if isinstance(world_config, dict):
        return WorldConfig(**world_config)
    raise TypeError("world_config must be a WorldConfig, a dict or None")


def train_organism(
    out_dir: str | Path,
    world_config: WorldConfig | dict | None = None,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 512,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.01,
    loss_on: str = "answers",
    seed: int = 0,
    threads: int = 2,
    evaluate: bool = True,
    log_every: int = 0,
) -> Path:
    """Train and save the organism into ``out_dir``; returns the folder.

    ``head_dim`` is independent of ``hidden_size`` (q/o projections are ``num_heads * head_dim``
    wide); vLLM's CPU attention needs it in {32, 64, 80, ...}. ``loss_on``: ``"answers"`` (the
    next-token loss on the answer tokens only, like supervised fine-tuning; converges about twice as
    fast) or ``"all"`` (every token, a plain LM). ``threads``: ``torch.set_num_threads`` for the run
    (0 leaves it alone).
    """
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if loss_on not in ("all", "answers"):
        raise ValueError("loss_on must be 'all' or 'answers'")
    wc = _world_config(world_config)
    world = World(wc)
    tokenizer = build_tokenizer(world)
    layout = world.token_layout(tokenizer)

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        seq_len = world.training_batch(layout, 1, np.random.default_rng(0))[0].shape[1]
        cfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            head_dim=head_dim, intermediate_size=intermediate_size,
            max_position_embeddings=max(256, 2 * seq_len), rms_norm_eps=1e-6, initializer_range=0.02,
            tie_word_embeddings=False, bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS), pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
            torch_dtype="float32",
        )
        cfg.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(cfg).float()
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.98), eps=1e-8,
        )

        def lr_at(step):
            if step < warmup_steps:
                return lr * (step + 1) / warmup_steps
            frac = (step - warmup_steps) / max(1, steps - warmup_steps)
            return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

        rng = np.random.default_rng(seed)
        history = []
        t0, c0 = time.perf_counter(), time.process_time()
        loss_val = answer_loss = float("nan")
        for step in range(steps):
            ids_np, mask_np, _ = world.training_batch(layout, batch_size, rng)
            ids = torch.from_numpy(ids_np)
            ans_mask = torch.from_numpy(mask_np[:, :-1])
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            per_tok = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(ids.shape[0], -1)
            loss = per_tok.mean() if loss_on == "all" else per_tok[ans_mask].mean()
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_val = float(loss.detach())
            answer_loss = float(per_tok.detach()[ans_mask].mean())
            if log_every and (step % log_every == 0 or step == steps - 1):
                history.append({"step": step, "loss": round(loss_val, 4), "answer_loss": round(answer_loss, 4),
                                "seconds": round(time.perf_counter() - t0, 1)})
                print(json.dumps(history[-1]), flush=True)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        model.eval()

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        record = {
            "world": wc.to_dict(),
            "model": {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
                      "num_kv_heads": num_kv_heads, "head_dim": head_dim,
                      "intermediate_size": intermediate_size, "vocab_size": len(tokenizer),
                      "parameters": sum(p.numel() for p in model.parameters())},
            "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
                         "weight_decay": weight_decay, "loss_on": loss_on, "seed": seed, "threads": threads,
                         "seq_len": seq_len, "final_loss": loss_val, "final_answer_loss": answer_loss,
                         "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                         "torch_threads": torch.get_num_threads(), "history": history},
        }
        if evaluate:
            record["eval"] = evaluate_organism(model, tokenizer, world)
        (out / ORGANISM_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return out
    finally:
        if threads:
            torch.set_num_threads(prev_threads)


def evaluate_organism(model, tokenizer, world: World) -> dict:
    """Unsteered greedy rates on the held-out honest- and lying-context prompts."""
    from .evaluate import evaluate_items

    res = {}
    for mode in ("honest", "lying"):
        r = evaluate_items(model, tokenizer, world.eval_items(mode), world.attributes)
        r.pop("answers")
        res[f"{mode}_context"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    return res


def load_organism(path: str | Path):
    """``(model, tokenizer, world, record)`` from a trained organism folder (float32, eval mode)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    world, record = organism_world(path)
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer, world, record


def organism_world(path: str | Path) -> tuple[World, dict]:
    """``(world, record)`` of a trained organism folder, from its ``organism.json``."""
    record = json.loads((Path(path) / ORGANISM_FILE).read_text())
    return World(WorldConfig(**record["world"])), record


def _normalised_params(params: dict) -> dict:
    sig = inspect.signature(train_organism)
    allowed = {n for n, p in sig.parameters.items() if n != "out_dir"}
    unknown = set(params) - allowed
    if unknown:
        raise TypeError(f"unknown organism parameters: {sorted(unknown)}")
    full = {n: p.default for n, p in sig.parameters.items() if n in allowed}
    full.update(params)
    full["world_config"] = asdict(_world_config(full["world_config"]))
    for n in ("log_every",):  # do not change the result
        full.pop(n)
    return full


def organism_key(**params) -> str:
    return hashlib.sha256(json.dumps(_normalised_params(params), sort_keys=True).encode()).hexdigest()[:12]


def cached_organism(cache_root: str | Path | None = None, **params) -> Path:
    """``train_organism(**params)`` into ``cache_root/organism-<hash of all params>``, only when missing.

    Built in a temporary folder beside the target and renamed into place, so readers never see a
    half-written organism and concurrent builders do not clash.
    """
    full = _normalised_params(params)
    root = Path(cache_root or os.environ.get("VLLM_STEER_CACHE") or Path.home() / ".cache" / "vllm-steer" / "models")
    target = root / f"organism-{organism_key(**params)}"
    if (target / ORGANISM_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".organism-", dir=root))
    try:
        kwargs = dict(full)
        kwargs["world_config"] = WorldConfig(**kwargs["world_config"])
        kwargs["log_every"] = params.get("log_every", 0)
        train_organism(tmp, **kwargs)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / ORGANISM_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (default: the cache, via cached_organism)")
    p.add_argument("--cache-root")
    for f in fields(WorldConfig):  # the world's seed is --world-seed (--seed is training's)
        typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        name = "world_seed" if f.name == "seed" else f.name
        p.add_argument("--" + name.replace("_", "-"), dest="world." + f.name, type=typ, default=f.default)
    sig = inspect.signature(train_organism)
    for n, prm in sig.parameters.items():
        if n in ("out_dir", "world_config", "evaluate", "log_every"):
            continue
        p.add_argument("--" + n.replace("_", "-"), type=type(prm.default), default=prm.default)
    p.add_argument("--log-every", type=int, default=100)
    a = vars(p.parse_args(argv))
    wc = WorldConfig(**{f.name: a.pop("world." + f.name) for f in fields(WorldConfig)})
    out, cache_root = a.pop("out"), a.pop("cache_root")
    if out:
        path = train_organism(out, wc, **a)
    else:
        path = cached_organism(cache_root, world_config=wc, **a)
    rec = json.loads((Path(path) / ORGANISM_FILE).read_text())
    rec["training"].pop("history", None)
    print(json.dumps({"path": str(path), "training": rec["training"], "eval": rec.get("eval")}, indent=2))


if __name__ == "__main__":
    main()
