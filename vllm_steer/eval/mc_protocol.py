"""How a TruthfulQA multiple-choice item becomes tokens: the prompt, the answer's continuation, which
of its tokens are scored, and where steering (and FASB's checks) start.

Two answer formats:

* ``"iti"`` (default, the project's own): prompt ``"Q: {question} A:"``, continuation
  ``" {answer}"`` (ITI's probe-training format, ``fit.datasets.qa_prompt``);
* ``"qa"``: TruthfulQA's QA format, as FASB's (and ITI's) released MC loops build it: prompt
  ``"Q: {question}"``, continuation ``"\\nA: {answer}"``.

Either is preceded by the instruction and the few-shot primer when given, joined by blank lines:
``"\\n\\n".join([instruction, primer, prompt])`` (the texts are used as given; none by default).
This project ships neither the TruthfulQA paper's instruction nor its primer.

Scored tokens (``scored``): ``"answer"`` (default, and what the reference does) scores the answer's
own tokens, leaving out the format's marker (``"\\nA:"`` in ``"qa"``; its token count comes from the
tokenizer, 3 for Llama-2, the count the reference hard-codes); ``"continuation"`` scores every token
after the prompt. The two are the same in the ``"iti"`` format (no marker).

Start (``start_offset``, default 4 as the reference's ``len(question prompt) + 4``): FASB checks and
steers from position ``len(prompt tokens) + start_offset`` (``eval.fasb_mc``). In the ``"qa"``
format the prompt ends before ``"\\nA:"``, so 4 is the reference's own start: past the marker's 3
tokens (Llama-2) and the answer's first token; in the ``"iti"`` format the prompt already ends with
``" A:"``, so 4 skips the answer's first 4 tokens. ITI and residual settings steer every answer
token: from the last prompt token (``"iti"``, as ITI's generation does) or, in ``"qa"``, from the
same start as FASB (the reference MC loop's ``start_edit_location``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_steer.errors import SteeringError
from vllm_steer.eval.fasb_mc import McAnswer

ANSWER_FORMATS = ("iti", "qa")
SCORED = ("answer", "continuation")
MAX_START_OFFSET = 4096


@dataclass(frozen=True)
class McProtocol:
    answer_format: str = "iti"
    instruction: str | None = None
    primer: str | None = None
    start_offset: int = 4
    scored: str = "answer"

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise SteeringError(f"the MC answer format must be one of {list(ANSWER_FORMATS)}, got "
                                f"{self.answer_format!r}", field="mc_format")
        if self.scored not in SCORED:
            raise SteeringError(f"the scored MC tokens must be one of {list(SCORED)}, got {self.scored!r}",
                                field="mc_scored")
        offset = self.start_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_START_OFFSET:
            raise SteeringError(f"the MC start offset must be an integer in [0, {MAX_START_OFFSET}], got {offset!r}",
                                field="mc_start_offset")
        for name in ("instruction", "primer"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise SteeringError(f"{name} must be text", field=name)

    @property
    def marker(self) -> str:
        """The text between the prompt and the answer that is not scored (``scored="answer"``)."""
        return "\nA:" if self.answer_format == "qa" else ""

    def prompt(self, question: str) -> str:
        head = f"Q: {question}" if self.answer_format == "qa" else f"Q: {question} A:"
        return "\n\n".join([t for t in (self.instruction, self.primer) if t] + [head])

    def continuation(self, answer: str) -> str:
        return f"{self.marker} {answer}"

    def steer_from(self, prompt_len: int) -> int:
        """First steered position of ITI / residual settings (module docstring)."""
        return prompt_len - 1 if self.answer_format == "iti" else prompt_len + self.start_offset

    def tokens(self, tokenizer, question: str, answer: str) -> McAnswer:
        """The prompt's tokens, the continuation's, and where its scored tokens start."""
        prompt = self.prompt(question)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        full = tokenizer(prompt + self.continuation(answer), add_special_tokens=True)["input_ids"]
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            answer_ids = full[len(prompt_ids):]
        else:  # the prompt's last token merges with the continuation's first: tokenize it on its own
            answer_ids = tokenizer(self.continuation(answer), add_special_tokens=False)["input_ids"]
            full = prompt_ids + answer_ids
        score_from = 0
        if self.scored == "answer" and self.marker:
            marked = tokenizer(prompt + self.marker, add_special_tokens=True)["input_ids"]
            same = next((i for i, (a, b) in enumerate(zip(marked, full)) if a != b), min(len(marked), len(full)))
            score_from = min(max(same - len(prompt_ids), 0), len(answer_ids) - 1)
        return McAnswer(tuple(prompt_ids), tuple(answer_ids), score_from)
