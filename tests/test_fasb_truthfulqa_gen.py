"""TruthfulQA generation under FASB, in the form of the authors' released script, against the
independent HF reference (``tests/reference/hf_fasb.py``).

The reference's prompt ends at the question (``"...\\n\\nQ: {question}"``): the model writes
``"\\nA:"`` itself, so those tokens are generated tokens. It generates all ``max_new_token`` tokens
greedily, with no stop strings, checking every step once ``s`` tokens exist and always at the last
step, then cuts the text at the first "Q:" and keeps what follows the first "A:". Our
``evaluate_generation(answer_prefix="generated")`` stops at the stop string "Q:" instead. The cases
below make a check fire after the model has written "Q:" (on a step the stop string could have
hidden) and early enough that its backtrack rewrites the answer, so the answers agree only if the
stop string ends a request no earlier than the reference's checks allow, and only if the answer
prefix is generated (counted toward ``max_tokens``, the checks and the backtrack).

The tiny model is trained here for a few seconds on QA text, so that it answers in the primer's
form and writes the next "Q:" on its own (a random-weight model never does).
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import close_llm, make_llm
from reference.hf_fasb import fasb_generate, truthfulqa_answer
from vllm_steer.eval.truthfulqa_gen import GenQuestion, cut_answer, evaluate_generation, generation_prompt
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack, with_constant_probes

INSTRUCTION = "Answer truthfully."
PRIMER = "Q: Who finds the light?\nA: The baker.\n\nQ: Who opens a red door?\nA: The teacher."
QUESTIONS = ["Who keeps the stars?", "Who paints an old map?", "Who carries the silver key?"]
ALPHA = 12.0
CONSTANT_P = 0.3  # the crafted probes' mean P(desired) at every token: a check fires wherever it runs


def _train_qa_model(out):
    """A tiny Llama trained on documents in the primer's form (deterministic, ~10 s on one thread)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer.models.tiny_checkpoint import _OBJECTS, _SUBJECTS, _VERBS, build_tiny_checkpoint

    build_tiny_checkpoint(out, "llama", seed=0)
    tok = AutoTokenizer.from_pretrained(str(out))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    rng = random.Random(0)

    def document() -> str:
        pairs = [f"Q: Who {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}?\nA: {rng.choice(_SUBJECTS).capitalize()}."
                 for _ in range(4)]
        return INSTRUCTION + "\n\n" + "\n\n".join(pairs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        batch = [tok(document())["input_ids"] for _ in range(16)]
        n = min(map(len, batch))
        x = torch.tensor([b[:n] for b in batch])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


class Case:
    def __init__(self, path, pack_path, llm):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.pack_path, self.llm = path, pack_path, llm
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.pack = load_file(str(pack_path))

    def prompt(self, question: str) -> str:
        """The authors' prompt: instruction, primer, question; no "A:" after it."""
        return INSTRUCTION + "\n\n" + PRIMER + "\n\nQ: " + question

    def reference(self, question: str, spec: dict | None, max_tokens: int):
        """(all generated tokens, the authors' answer): HF, no stop strings, cut afterwards."""
        ids = self.tok(self.prompt(question))["input_ids"]
        if spec is None:  # FASB that never fires is plain greedy decoding
            spec = {"alpha": 0.0, "threshold": 0.0, "backtrack": 1}
        trace = fasb_generate(self.hf, ids, self.pack, alpha=spec["alpha"], threshold=spec.get("threshold", 0.5),
                              backtrack=spec["backtrack"], min_tokens=spec.get("min_tokens"),
                              max_backtracks=spec.get("max_backtracks", 1), max_tokens=max_tokens,
                              eos_token_id=self.tok.eos_token_id, ignore_eos=False)
        return trace.tokens, truthfulqa_answer(self.tok.decode(trace.tokens, skip_special_tokens=True))

    def stop_token_index(self, tokens) -> int:
        """q: how many generated tokens it takes to complete the first "Q:"."""
        for q in range(1, len(tokens) + 1):
            if "Q:" in self.tok.decode(tokens[:q], skip_special_tokens=True):
                return q
        raise AssertionError(f"no 'Q:' in {self.tok.decode(tokens)!r}")


@pytest.fixture(scope="module")
def case(model_cache, tmp_path_factory):
    path = model_cache / "llama-qa-trained-v1"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        _train_qa_model(path)
    probed = random_pack(shape_of_checkpoint(path), "probed", num_heads_selected=6, with_probes=True, seed=11,
                         sigma_scale=4.0)
    pack_path = save_pack(tmp_path_factory.mktemp("qa_packs") / "crafted.safetensors",
                          with_constant_probes(probed, CONSTANT_P, name="crafted"))
    llm = make_llm(path, packs=[pack_path], enforce_eager=True)
    yield Case(path, pack_path, llm)
    close_llm(llm)


def test_the_answer_is_cut_as_the_authors_cut_it():
    for text in ["\nA: The train.\n\nQ: Who keeps", " The train.\n\nQ:", "\nA: one A: two\nQ: x", "Q: at once",
                 "\nA: no question after", "", "  A:  \n", "A: x\nQ: y\nA: z"]:
        assert cut_answer(text, "generated") == truthfulqa_answer(text), text
    assert cut_answer(" The train.\n\nQ: Who", "prompt") == "The train."
    assert cut_answer("\nA: The train.\n\nQ: Who", "prompt") == "A: The train."
    assert generation_prompt("Who?", "I.", "P.", "generated") == "I.\n\nP.\n\nQ: Who?"
    assert generation_prompt("Who?", "I.", "P.", "prompt") == "I.\n\nP.\n\nQ: Who?\nA:"
    with pytest.raises(ValueError, match="answer_prefix"):
        generation_prompt("Who?", answer_prefix="model")


def _spec(**knobs) -> dict:
    return {"pack": "crafted", "method": "fasb", "alpha": ALPHA, "threshold": 0.5, **knobs}


@pytest.mark.parametrize("where", ["after_the_stop_string", "last_step", "prefix", "small_s"])
def test_answers_equal_the_reference_generating_everything_then_cutting(case, where):
    from vllm import SamplingParams

    assert generation_prompt(QUESTIONS[0], INSTRUCTION, PRIMER, "generated") == case.prompt(QUESTIONS[0])
    plain, plain_answer = case.reference(QUESTIONS[0], None, 24)
    q = case.stop_token_index(plain)  # the unsteered run completes "Q:" at its q-th token
    assert 8 <= q <= 16, case.tok.decode(plain)
    max_tokens = 24
    if where == "after_the_stop_string":  # the first check, right after "Q:", keeps only "\nA: "
        spec = _spec(backtrack=q - 3, min_tokens=q + 1)
    elif where == "last_step":  # only the forced check at the last step, right after "Q:", runs
        spec = _spec(backtrack=q - 3, min_tokens=100)
        max_tokens = q + 1
    elif where == "prefix":  # fires once s = 4 tokens exist: the generated "\nA:" prefix and one more
        spec = _spec(backtrack=4)
    else:  # s = 4, firing right after "Q:": regenerates the end of the answer and the "Q:"
        spec = _spec(backtrack=4, min_tokens=q + 1)
    questions = [GenQuestion(text, ("The baker.",), ("The river.",)) for text in QUESTIONS]
    got = [r["answer"] for r in evaluate_generation(case.llm, questions, spec, max_tokens=max_tokens,
                                                    instruction=INSTRUCTION, primer=PRIMER,
                                                    answer_prefix="generated")]
    refs = [case.reference(text, spec, max_tokens) for text in QUESTIONS]
    assert got == [answer for _, answer in refs]
    # Our engine without stop strings: every token as the reference's (max_tokens counts the kept
    # tokens, the generated prefix included), the same answers once cut.
    prompts = [case.prompt(text) for text in QUESTIONS]
    full = case.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                     extra_args={"steering": spec}), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in full] == [tokens for tokens, _ in refs]
    assert [cut_answer(o.outputs[0].text, "generated") for o in full] == got
    assert all(len(tokens) == max_tokens for tokens, _ in refs)
    if where in ("after_the_stop_string", "last_step", "prefix"):
        # The check rewrote the answer: a request that ended at the stop string before that check
        # (or one whose prompt held the "\nA:") would have kept another answer.
        assert refs[0][1] != plain_answer, (refs[0][1], plain_answer)


def test_the_eval_job_runs_the_reference_form(case, tmp_path):
    """``vllm-steer eval --answer-prefix generated``: EvalJob hands the form to the generation."""
    import json

    from conftest import truthfulqa_dir
    from vllm_steer.eval.job import EvalJob, Setting, ShardRunner, run_job
    from vllm_steer.eval.truthfulqa_gen import load_gen_questions

    spec = _spec(backtrack=4)
    job = EvalJob(model=str(case.path), data=str(truthfulqa_dir() / "TruthfulQA.csv"), packs=(str(case.pack_path),),
                  benchmark="truthfulqa_gen", settings=(Setting(spec),), num_shards=1, limit=2, max_tokens=16,
                  instruction=INSTRUCTION, primer=PRIMER, answer_prefix="generated")
    report = run_job(job, tmp_path, progress=False, runner=ShardRunner(job.to_json(), llm=case.llm))
    assert report.complete
    got = [r["answer"] for r in json.loads((tmp_path / "results.json").read_text())[0]["items"]]
    questions = load_gen_questions(job.data)[:2]
    assert got == [case.reference(q.question, spec, 16)[1] for q in questions]
