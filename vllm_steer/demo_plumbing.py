"""``vllm-steer demo --plumbing``: build a random-weight tiny model and a random steer pack offline,
then generate with vLLM's own ``LLM`` class: unsteered, ITI head steering at two strengths, and
residual steering, all in one batch, and the same prompts through an engine without the plugin to
show unsteered rows match. It proves the wiring for any supported family; the text is noise.
"""

from __future__ import annotations

import os
from pathlib import Path

PROMPTS = ["The river", "A small bird", "Yesterday the market", "Every morning she"]


def run_plumbing_demo(family: str = "llama", workdir: str = "runs/demo-plumbing", max_tokens: int = 24) -> int:
    from vllm import LLM, SamplingParams

    from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
    from vllm_steer.pack import save_pack
    from vllm_steer.pack.hf_shape import shape_of_checkpoint
    from vllm_steer.pack.synthetic import random_pack

    root = Path(workdir)
    model = cached_tiny_checkpoint(family, cache_root=root / "models")
    shape = shape_of_checkpoint(model)
    pack = save_pack(
        root / "demo.safetensors",
        random_pack(shape, "demo", num_heads_selected=6, residual_layers=[1], seed=0),
    )
    print(f"model: {model} ({shape.architecture}, {shape.num_layers} layers x {shape.num_heads} heads)")
    print(f"pack:  {pack}")

    settings = [
        ("unsteered", None),
        ("iti alpha=3", {"pack": "demo", "method": "iti", "alpha": 3.0}),
        ("iti alpha=8", {"pack": "demo", "method": "iti", "alpha": 8.0}),
        ("residual alpha=2", {"pack": "demo", "method": "residual", "alpha": 2.0}),
    ]
    from vllm_steer.integration.job_engine import job_engine_kwargs

    common = dict(model=str(model), seed=0,
                  **job_engine_kwargs(model, max_model_len=256, max_num_seqs=32, dtype="float32"))
    llm = LLM(**common, additional_config={"steering": {"packs": [str(pack)]}})
    prompts, params = [], []
    for _, spec in settings:
        for text in PROMPTS:
            prompts.append(text)
            params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                         extra_args={"steering": spec} if spec else None))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    del llm

    # The same prompts through an engine with no steering at all.
    os.environ["VLLM_PLUGINS"] = "none"  # engine processes started from here load no plugin
    plain = LLM(**common).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                          ignore_eos=True), use_tqdm=False)
    plain_ids = [list(o.outputs[0].token_ids) for o in plain]

    for i, (label, _) in enumerate(settings):
        print(f"\n== {label}")
        for j, text in enumerate(PROMPTS):
            out = outputs[i * len(PROMPTS) + j].outputs[0]
            print(f"  {text!r} -> {out.text!r}")
    unsteered_ids = [list(outputs[j].outputs[0].token_ids) for j in range(len(PROMPTS))]
    changed = [
        sum(list(outputs[i * len(PROMPTS) + j].outputs[0].token_ids) != unsteered_ids[j] for j in range(len(PROMPTS)))
        for i in range(1, len(settings))
    ]
    same = unsteered_ids == plain_ids
    print(f"\nunsteered rows identical to a plugin-free engine: {same}")
    for (label, _), n in zip(settings[1:], changed):
        print(f"{label}: changed {n}/{len(PROMPTS)} continuations")
    return 0 if same else 1
