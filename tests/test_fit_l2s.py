"""The L2S trainer on synthetic data: it learns an input-dependent target that Mean-S cannot."""

import pytest
import torch

from vllm_steer.errors import SteeringError
from vllm_steer.fit.l2s import L2STrainOptions, train_l2s


def _data(n=400, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    kind = (x[:, 0] > 0).float().unsqueeze(1)  # two kinds of input, opposite desired directions
    direction = torch.randn(d, generator=gen)
    z = (2 * kind - 1) * direction + 0.05 * torch.randn(n, d, generator=gen)
    return x, z


def test_predictor_beats_mean_s_on_input_dependent_targets():
    x, z = _data()
    fit = train_l2s(x, z, L2STrainOptions(width=8, lr=1e-2, epochs=60, seed=1))
    rec = fit.record
    assert rec["val_cosine"] > 0.8 and rec["val_cosine_mean_s"] < 0.3
    assert fit.w_in.shape == (8, 16) and fit.w_out.shape == (16, 8) and fit.mean.shape == (16,)
    assert rec["num_train"] + rec["num_val"] == 400 and 0 <= rec["best_epoch"] < rec["epochs_run"]


def test_training_is_seeded_and_stops_early():
    x, z = _data(n=80)
    a = train_l2s(x, z, L2STrainOptions(width=4, lr=1e-2, epochs=200, patience=3, seed=2, loss="mse"))
    b = train_l2s(x, z, L2STrainOptions(width=4, lr=1e-2, epochs=200, patience=3, seed=2, loss="mse"))
    assert torch.equal(a.w_in, b.w_in) and torch.equal(a.w_out, b.w_out)
    assert a.record["epochs_run"] < 200


def test_bad_inputs_name_the_field():
    with pytest.raises(SteeringError) as info:
        train_l2s(torch.zeros(10, 4), torch.zeros(10, 5))
    assert info.value.field == "targets"
    with pytest.raises(SteeringError, match="at least 4"):
        train_l2s(torch.zeros(2, 4), torch.zeros(2, 4))


# -- through the chat template (vllm-steer fit l2s --chat-template) -------------------------------------
def _pairs(path, n=8):
    import json

    rows = [{"prompt": f"Q: is {i} even? A:", "positive": " yes" if i % 2 == 0 else " no",
             "negative": " no" if i % 2 == 0 else " yes"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_fit_through_the_chat_template_reads_what_hf_reads_there(tiny_model, tmp_path, monkeypatch):
    """Inputs: the stream after L' at the last token of the one-message chat rendering with the
    generation prompt (what LLM.chat sends); targets: the rendered prompt + completion at L*. Both
    as plain HF computes them; the manifest records the prompt format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import close_llm
    from vllm_steer.fit import l2s_pipeline
    from vllm_steer.fit.capture import capture_engine
    from vllm_steer.pack import load_pack

    model = tiny_model("llama")
    rows = _pairs(tmp_path / "pairs.jsonl")
    seen = {}

    def spy(x, z, options):
        seen["x"], seen["z"] = x.clone(), z.clone()
        return train_l2s(x, z, options)

    monkeypatch.setattr(l2s_pipeline, "train_l2s", spy)
    llm = capture_engine(str(model), max_model_len=512, max_num_seqs=16)
    try:
        record = l2s_pipeline.fit_l2s_pack(str(model), tmp_path / "pairs.jsonl", tmp_path / "chat.safetensors",
                                           l2s_pipeline.L2SFitOptions(
                                               name="chat", read_layer=1, steer_layer=2, chat_template=True,
                                               progress=False, max_model_len=512,
                                               train=L2STrainOptions(width=4, epochs=2, seed=0)), llm=llm)
    finally:
        close_llm(llm)
    pack = load_pack(tmp_path / "chat.safetensors")
    assert pack.manifest.l2s.prompt_format == "chat" and record["prompt_format"] == "chat"

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model))

    def stream(text, layer):
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            return hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0, -1]

    rendered = [l2s_pipeline.render_chat_prompt(tok, r["prompt"]) for r in rows]
    assert all(t.endswith("assistant:") and r["prompt"] in t for t, r in zip(rendered, rows))
    x = torch.stack([stream(t, 1) for t in rendered])
    z = torch.stack([stream(t + r["positive"], 2) - stream(t + r["negative"], 2) for t, r in zip(rendered, rows)])
    for got, want in ((seen["x"], x), (seen["z"], z)):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    raw = torch.stack([stream(r["prompt"], 1) for r in rows])  # not what the chat fit reads
    assert not torch.allclose(seen["x"], raw, rtol=1e-2, atol=1e-2 * float(raw.abs().max()))


def test_cli_fit_l2s_chat_template(tiny_model, tmp_path):
    """``vllm-steer fit l2s --chat-template`` writes a pack that says it was fitted through the chat
    template (a tokenizer without one is refused naming the flag: test_cli_user_errors)."""
    import subprocess
    import sys
    from pathlib import Path

    from vllm_steer.pack import load_pack

    model = tiny_model("llama")
    _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "chat.safetensors"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vllm-steer"), "fit", "l2s", "--model", str(model), "--data",
         str(tmp_path / "pairs.jsonl"), "--out", str(out), "--read-layer", "2", "--steer-layer", "2",
         "--chat-template", "--width", "4", "--epochs", "2", "--max-model-len", "256"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pack = load_pack(out)
    assert '"prompt_format": "chat"' in proc.stdout  # the record (after vLLM's log)
    assert pack.manifest.l2s.prompt_format == "chat" and pack.manifest.metadata["l2s"]["prompt_format"] == "chat"
    assert (pack.manifest.l2s.read_layer, pack.manifest.l2s.steer_layer) == (2, 2)
