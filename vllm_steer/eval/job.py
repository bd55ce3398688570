"""An evaluation job: one model, several steering settings, items split into shards; shards run in this
process or on Ray actors (each actor owns one vLLM engine with the plugin), and a job can resume.

Layout of the output folder::

    job.json                 the job's definition (a resumed job must match it)
    shards/S-K.json          per-item results of setting S on shard K (written atomically)
    results.json             every per-item result, by setting
    summary.md, summary.json one row per setting: mean MC1/MC2/MC3 (truthfulqa_mc); BLEU-acc,
                             ROUGE-1/2/L-acc, length, no-comment rate (truthfulqa_gen); truthful,
                             expected-false and well-formed rates, also per item group
                             (short_answer, e.g. the organism); and n
    summary.png              MC2 (ROUGE-1-acc, truthful rate) vs alpha, one line per method

A shard's items always go to the engine in one batch, so a shard gives the same numbers wherever it
runs (in this process or on any actor).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from vllm_steer.errors import SteeringError

# benchmark -> (per-item metrics averaged in the summary, the one plotted against alpha)
BENCHMARKS = {
    "truthfulqa_mc": (("mc1", "mc2", "mc3"), "mc2"),
    "truthfulqa_gen": (("bleu_acc", "rouge1_acc", "rouge2_acc", "rougeL_acc", "length", "no_comment"), "rouge1_acc"),
    "short_answer": (("truthful", "expected_false", "well_formed"), "truthful"),
}
RAY_CONNECT_TIMEOUT_S = 5.0
RAY_CONNECT_ATTEMPTS = 5
RAY_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
EVAL_MAX_NUM_SEQS = 64  # requests one job engine runs at once (a shard's others queue)


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: a steering spec for every item (None: unsteered)."""

    spec: dict | None = None

    @property
    def label(self) -> str:
        if self.spec is None:
            return "none"
        spec = self.spec
        if spec.get("method") == "off":
            return "off"
        knobs = ", ".join(f"{k}={spec[k]}" for k in sorted(spec) if k not in ("pack", "method", "alpha"))
        return f"{spec.get('method', 'iti')} {spec.get('pack')} alpha={spec.get('alpha', 1.0)}" + (
            f" ({knobs})" if knobs else "")


@dataclass(frozen=True)
class EvalJob:
    model: str
    data: str  # mc_task.json (truthfulqa_mc), TruthfulQA.csv (truthfulqa_gen), items JSONL (short_answer)
    packs: tuple[str, ...] = ()
    settings: tuple[Setting, ...] = (Setting(),)
    benchmark: str = "truthfulqa_mc"
    num_shards: int = 4
    limit: int | None = None  # the first N items only
    engine: dict = field(default_factory=dict)  # extra LLM(...) arguments
    max_tokens: int = 50  # truthfulqa_gen / short_answer: new tokens per answer
    instruction: str | None = None  # None: truthfulqa_gen the project's default instruction, truthfulqa_mc none
    primer: str | None = None  # None: truthfulqa_gen the project's default few-shot primer, truthfulqa_mc none
    folds: int = 1  # > 1: question q is scored with pack "{spec pack}.fold{fold_of(q)}" (eval.folds)
    fold_seed: int = 0
    mc_format: str = "iti"  # truthfulqa_mc: eval.mc_protocol (answer format, start offset, scored tokens)
    mc_start_offset: int = 4
    mc_scored: str = "answer"
    # truthfulqa_gen: the prompt ends with "\nA:" ("prompt") or at the question, the model writing
    # "\nA:" itself ("generated", as FASB's released code does; eval.truthfulqa_gen)
    answer_prefix: str = "prompt"

    def __post_init__(self):
        self.mc_protocol()  # raises SteeringError naming the mc_* field
        for name in ("mc_format", "mc_start_offset", "mc_scored"):
            if self.benchmark != "truthfulqa_mc" and getattr(self, name) != EvalJob.__dataclass_fields__[name].default:
                raise SteeringError(f"{name} applies to the truthfulqa_mc benchmark only, not {self.benchmark}",
                                    field=name)
        if self.benchmark not in BENCHMARKS:
            raise SteeringError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {self.benchmark!r}",
                                field="benchmark")
        if self.num_shards < 1:
            raise SteeringError("num_shards must be >= 1", field="num_shards")
        if not self.settings:
            raise SteeringError("a job needs at least one setting", field="settings")
        if self.folds < 1:
            raise SteeringError("folds must be >= 1", field="folds")
        from vllm_steer.eval.truthfulqa_gen import ANSWER_PREFIXES

        if self.answer_prefix not in ANSWER_PREFIXES:
            raise SteeringError(f"answer_prefix must be {' or '.join(map(repr, ANSWER_PREFIXES))}, got "
                                f"{self.answer_prefix!r}", field="answer_prefix")
        if self.answer_prefix != "prompt" and self.benchmark != "truthfulqa_gen":
            raise SteeringError(f"answer_prefix applies to the truthfulqa_gen benchmark only, not {self.benchmark}",
                                field="answer_prefix")

    def to_json(self) -> dict:
        """Plain JSON data (lists, not tuples), as stored in job.json."""
        return json.loads(json.dumps({**asdict(self), "settings": [s.spec for s in self.settings]}))

    @classmethod
    def from_json(cls, raw: dict) -> EvalJob:
        raw = dict(raw)
        raw["settings"] = tuple(Setting(s) for s in raw["settings"])
        raw["packs"] = tuple(raw["packs"])
        return cls(**raw)

    def mc_protocol(self):
        """How truthfulqa_mc items become tokens (``eval.mc_protocol.McProtocol``)."""
        from vllm_steer.eval.mc_protocol import McProtocol

        return McProtocol(answer_format=self.mc_format, instruction=self.instruction, primer=self.primer,
                          start_offset=self.mc_start_offset, scored=self.mc_scored)

    @property
    def needs_capture(self) -> bool:
        """FASB's MC scoring reads head activations (generation runs FASB in the engine itself)."""
        return self.benchmark == "truthfulqa_mc" and any(
            s.spec is not None and s.spec.get("method") == "fasb" for s in self.settings)


def load_items(benchmark: str, data: str | Path, limit: int | None = None) -> list:
    """The benchmark's items in ``data`` (the first ``limit``), read by its loader; raises DatasetError
    naming the file and the entry."""
    from vllm_steer.eval.short_answer import load_short_answer_items
    from vllm_steer.eval.truthfulqa_gen import load_gen_questions
    from vllm_steer.eval.truthfulqa_mc import load_mc_questions

    load = {"truthfulqa_mc": load_mc_questions, "truthfulqa_gen": load_gen_questions,
            "short_answer": load_short_answer_items}[benchmark]
    items = load(data)
    return items if limit is None else items[:limit]


def check_prompt_lengths(job: EvalJob, items: Sequence, tokenizer, max_model_len: int) -> None:
    """Raise SteeringError(field="max_model_len") when an item sends the engine more tokens than
    ``max_model_len`` (a prompt, or for MC a prompt and its longest answer), before any engine starts."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    for i, item in enumerate(items):
        if job.benchmark == "truthfulqa_mc":
            protocol = job.mc_protocol()
            n = max(len(a.prompt_ids) + len(a.answer_ids)
                    for a in (protocol.tokens(tokenizer, item.question, answer) for answer, _ in item.mc1 + item.mc2))
        elif job.benchmark == "truthfulqa_gen":
            from vllm_steer.eval.truthfulqa_gen import DEFAULT_INSTRUCTION, DEFAULT_PRIMER, generation_prompt

            n = count(generation_prompt(item.question,
                                        DEFAULT_INSTRUCTION if job.instruction is None else job.instruction,
                                        DEFAULT_PRIMER if job.primer is None else job.primer, job.answer_prefix))
        else:
            n = count(item.prompt)
        if n > max_model_len:
            what = "prompt and answer" if job.benchmark == "truthfulqa_mc" else "prompt"
            raise SteeringError(f"item {i} of {job.data} needs {n} tokens ({what}), more than max_model_len "
                                f"{max_model_len}", field="max_model_len")


def shard_ranges(num_items: int, num_shards: int) -> list[range]:
    """``num_shards`` contiguous, near-equal shards (the first ones one item longer; empty ones when
    there are fewer items than shards)."""
    base, extra = divmod(num_items, num_shards)
    out, start = [], 0
    for k in range(num_shards):
        end = start + base + (k < extra)
        out.append(range(start, end))
        start = end
    return out


class ShardRunner:
    """Owns one engine; runs (setting, shard) units. Used in-process and as the Ray actor class."""

    def __init__(self, job_json: dict, llm=None, engines_sharing_memory: int = 1) -> None:
        """``engines_sharing_memory``: engines started side by side in this machine's CPU memory (for
        the KV-cache sizing of this one, ``integration.job_engine``)."""
        from transformers import AutoTokenizer

        self.job = EvalJob.from_json(job_json)
        self.questions = load_items(self.job.benchmark, self.job.data, self.job.limit)
        self.tokenizer = AutoTokenizer.from_pretrained(self.job.model)
        self.engines_sharing_memory = engines_sharing_memory
        self.llm = llm if llm is not None else self._engine()  # a given engine must load the job's packs
        self.packs = {}
        if self.job.packs:
            from vllm_steer.pack import load_pack

            for path in self.job.packs:
                pack = load_pack(path)
                self.packs[pack.name] = pack

    def _engine(self):
        """The job's engine: ``job.engine`` (explicit LLM arguments) over the job's own settings
        (``integration.job_engine``: the model's length, at most 1024; EVAL_MAX_NUM_SEQS; the model's
        dtype; a KV cache sized for that)."""
        from vllm import LLM

        from vllm_steer.integration.job_engine import engine_settings_errors, job_engine_kwargs

        explicit: dict[str, Any] = {"seed": 0}
        steering: dict[str, Any] = {"packs": list(self.job.packs)}
        if self.job.needs_capture:  # FASB's MC scoring reads head activations
            steering["capture"] = True
            explicit.update(enforce_eager=True, enable_prefix_caching=False)
        explicit.update(self.job.engine)
        kwargs = job_engine_kwargs(self.job.model, max_model_len=None, max_num_seqs=EVAL_MAX_NUM_SEQS, dtype="auto",
                                   user_kwargs=explicit, engines_sharing_memory=self.engines_sharing_memory)
        with engine_settings_errors():
            return LLM(model=self.job.model, **kwargs, additional_config={"steering": steering})

    def run(self, setting_index: int, shard: int) -> list[dict]:
        """Per-item results of one setting on one shard, in item order. With folds, each fold's
        questions go to the engine as one batch, with that fold's pack."""
        from vllm_steer.eval.folds import fold_of, fold_pack_name

        setting = self.job.settings[setting_index]
        items = list(shard_ranges(len(self.questions), self.job.num_shards)[shard])
        if not items:
            return []
        groups: dict[int, list[int]] = {}
        for i in items:
            fold = fold_of(self.questions[i].question, self.job.folds, self.job.fold_seed) if self.job.folds > 1 else 0
            groups.setdefault(fold, []).append(i)
        rows: dict[int, dict] = {}
        for fold, members in sorted(groups.items()):
            spec = setting.spec
            if spec is not None and self.job.folds > 1:
                spec = {**spec, "pack": fold_pack_name(spec["pack"], fold)}
            for i, row in zip(members, self._evaluate([self.questions[i] for i in members], spec)):
                rows[i] = {"item": i, **({"fold": fold} if self.job.folds > 1 else {}), **row}
        return [rows[i] for i in items]

    def _evaluate(self, questions, spec: dict | None) -> list[dict]:
        if self.job.benchmark == "short_answer":
            from vllm_steer.eval.short_answer import evaluate_short_answers

            return evaluate_short_answers(self.llm, questions, spec, max_tokens=self.job.max_tokens)
        if self.job.benchmark == "truthfulqa_gen":
            from vllm_steer.eval.truthfulqa_gen import DEFAULT_INSTRUCTION, DEFAULT_PRIMER, evaluate_generation

            return evaluate_generation(
                self.llm, questions, spec, max_tokens=self.job.max_tokens,
                instruction=DEFAULT_INSTRUCTION if self.job.instruction is None else self.job.instruction,
                primer=DEFAULT_PRIMER if self.job.primer is None else self.job.primer,
                answer_prefix=self.job.answer_prefix)
        from vllm_steer.eval.truthfulqa_mc import evaluate_mc

        pack = self.packs.get(spec["pack"]) if spec else None
        return [{"question": r.question, "mc1": r.mc1, "mc2": r.mc2, "mc3": r.mc3, "scores": r.scores}
                for r in evaluate_mc(self.llm, self.tokenizer, questions, spec, pack=pack,
                                     protocol=self.job.mc_protocol())]

@dataclass
class JobReport:
    done: int  # units finished in this run
    skipped: int  # units found finished on disk (resume)
    failed: list[str]  # "setting S shard K: why"
    out: Path

    @property
    def complete(self) -> bool:
        return not self.failed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _same_job(stored: dict, job: EvalJob) -> bool:
    """``stored`` (a job.json) defines ``job``; a job.json written before a field existed holds its default."""
    if stored == job.to_json():
        return True
    try:
        return EvalJob.from_json(stored).to_json() == job.to_json()
    except (TypeError, KeyError, SteeringError):
        return False


def _check_folder(job: EvalJob, out: Path) -> None:
    """Raise SteeringError(field="out") when ``out`` holds another job."""
    definition = out / "job.json"
    if definition.exists() and not _same_job(json.loads(definition.read_text()), job):
        raise SteeringError(f"{out} holds another job (job.json differs); use a new folder", field="out")


def _prepare(job: EvalJob, out: Path) -> list[tuple[int, int]]:
    _check_folder(job, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    definition = out / "job.json"
    if not definition.exists():
        _write_atomic(definition, json.dumps(job.to_json(), indent=2))
    return [(s, k) for s in range(len(job.settings)) for k in range(job.num_shards)]


def _shard_file(out: Path, setting: int, shard: int) -> Path:
    return out / "shards" / f"{setting}-{shard}.json"


def run_job(
    job: EvalJob,
    out: str | Path,
    *,
    num_actors: int = 0,
    ray_address: str | None = None,
    progress: bool = True,
    on_unit_done: Callable[[int, int, Any], None] | None = None,
    runner: ShardRunner | None = None,
) -> JobReport:
    """Run every unfinished (setting, shard) unit; ``num_actors=0`` runs them in this process.

    ``on_unit_done(setting, shard, actor)`` is called after each unit is saved (``actor`` is None
    in-process). ``runner``: an in-process runner to reuse (its engine) instead of building one.
    A failed unit (e.g. its actor died) is reported in ``JobReport.failed``; the others still run,
    and a later run with the same ``out`` redoes only the missing units."""
    from tqdm import tqdm

    out = Path(out)
    _check_folder(job, out)
    units = [(s, k) for s in range(len(job.settings)) for k in range(job.num_shards)]
    todo = [u for u in units if not _shard_file(out, *u).exists()]
    joined_ray = False
    if todo and num_actors > 0:  # join (or start) Ray before writing anything: a bad address stops here
        import ray

        if not ray.is_initialized():
            _join_ray(ray, ray_address)
            joined_ray = True
    try:
        _prepare(job, out)
        report = JobReport(done=0, skipped=len(units) - len(todo), failed=[], out=out)
        bar = tqdm(total=len(units), initial=report.skipped, desc="eval shards", disable=not progress)

        def save(unit, rows):
            _write_atomic(_shard_file(out, *unit), json.dumps(rows))
            report.done += 1
            bar.update(1)

        try:
            if todo and num_actors <= 0:
                runner = runner if runner is not None else ShardRunner(job.to_json())
                for unit in todo:
                    save(unit, runner.run(*unit))
                    if on_unit_done is not None:
                        on_unit_done(*unit, None)
            elif todo:
                _run_on_ray(job, todo, num_actors, save, report, on_unit_done)
        finally:
            bar.close()
    finally:
        if joined_ray:
            ray.shutdown()
    if report.complete:
        write_summary(job, out)
    return report


def check_ray_address(address: str | None, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming ``ray_address``, when ``address`` (``host:port`` or ``ray://host:port``) does
    not accept a connection within ``timeout_s``: Ray itself keeps retrying for minutes. ``None``,
    ``auto`` and ``local`` are left to Ray."""
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise SteeringError(f"ray_address {address!r} is not host:port (or ray://host:port, auto, local)",
                            field="ray_address")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "no answer within {:g} s".format(timeout_s) if isinstance(exc, TimeoutError) else str(exc)
        raise SteeringError(f"no Ray cluster reachable at ray_address {address} ({why})", field="ray_address") from None


def _join_ray(ray, address: str | None) -> None:
    """``ray.init`` that fails fast, naming ``ray_address``, when ``address`` has no Ray cluster: the
    address must accept a connection (``check_ray_address``), and Ray gets RAY_CONNECT_ATTEMPTS
    one-second attempts to find its GCS there (``RAY_gcs_server_port_wait_time_s``, unless set),
    not its default of about twenty."""
    check_ray_address(address)
    bounded = address not in (None, "auto", "local") and RAY_GCS_WAIT_ENV not in os.environ
    if bounded:
        os.environ[RAY_GCS_WAIT_ENV] = str(RAY_CONNECT_ATTEMPTS)
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except ConnectionError as exc:
        raise SteeringError(f"cannot join a Ray cluster at ray_address {address or 'auto'}: {exc}"
                            f"{_ray_join_reason(exc)}", field="ray_address") from None
    finally:
        if bounded:
            del os.environ[RAY_GCS_WAIT_ENV]


def _ray_join_reason(exc: BaseException) -> str:
    """Why Ray could not join, where its ConnectionError hides it: a cluster started with token
    authentication (Ray's default for new clusters since 2.5x) refuses a driver without its token."""
    cause = exc.__cause__
    while cause is not None:
        if "AuthToken" in str(cause) or type(cause).__name__ == "AuthenticationError":
            return (" (the cluster requires its authentication token: set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, as on the cluster's nodes)")
        cause = cause.__cause__
    return ""


def ray_cluster_description(ray) -> str:
    """The Ray cluster this process has joined: its GCS address and nodes (for the job's log)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return (f"Ray cluster at {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s) "
            f"({', '.join(sorted(n['NodeManagerAddress'] for n in nodes))})")


def _run_on_ray(job, todo, num_actors, save, report, on_unit_done) -> None:
    """Run ``todo`` on ``num_actors`` actors of the Ray cluster this process has joined."""
    import ray

    # Actors start engines of their own: pass on the settings vLLM and HF read from the environment.
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_", "TOKENIZERS_", "OMP_"))}
    actor_cls = ray.remote(num_cpus=0)(ShardRunner)
    count = min(num_actors, len(todo))
    print(f"eval: {count} actor(s) on the {ray_cluster_description(ray)}", file=sys.stderr, flush=True)
    # One GPU per actor where the cluster has GPUs (Ray sets each actor's CUDA_VISIBLE_DEVICES);
    # otherwise disjoint CPU cores per actor.
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    actors = [
        actor_cls.options(num_gpus=1 if gpus else 0,
                          runtime_env={"env_vars": {**env, **({} if gpus else _cpu_binding(i, count))}})
        .remote(job.to_json(), engines_sharing_memory=1 if gpus else count)
        for i in range(count)
    ]
    queue = list(todo)
    running: dict[Any, tuple[tuple[int, int], Any]] = {}
    idle = list(actors)
    while queue or running:
        while queue and idle:
            actor = idle.pop()
            unit = queue.pop(0)
            running[actor.run.remote(*unit)] = (unit, actor)
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            unit, actor = running.pop(ref)
            try:
                rows = ray.get(ref)
            except Exception as exc:  # the actor died or the unit raised: report it, go on
                report.failed.append(f"setting {unit[0]} shard {unit[1]}: {type(exc).__name__}: {exc}")
                continue
            save(unit, rows)
            idle.append(actor)
            if on_unit_done is not None:
                on_unit_done(*unit, actor)
        if not idle and not running and queue:  # every actor is gone
            report.failed += [f"setting {s} shard {k}: not run (no live actor)" for s, k in queue]
            queue.clear()


def _cpu_binding(index: int, count: int) -> dict:
    """Without GPUs, give each actor's engine its own CPU cores: vLLM's CPU worker binds its threads
    to cores by itself, and engines started side by side would pick the same ones. Nothing is set
    when the user set ``VLLM_CPU_OMP_THREADS_BIND``. (Cores of this machine: a local cluster.)"""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = cores[index::count] if len(cores) >= count else [cores[index % len(cores)]]
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, share))}


def collect_results(job: EvalJob, out: Path) -> list[list[dict]]:
    """Per setting, every per-item result in item order."""
    per_setting = []
    for s in range(len(job.settings)):
        rows = []
        for k in range(job.num_shards):
            rows += json.loads(_shard_file(out, s, k).read_text())
        per_setting.append(sorted(rows, key=lambda r: r["item"]))
    return per_setting


def _summary_metrics(job: EvalJob, per_setting: Sequence[list[dict]]) -> list[str]:
    """The benchmark's metrics, then per-group ones (``truthful[lying]``) found in the items."""
    metrics, _ = BENCHMARKS[job.benchmark]
    grouped = sorted({k for results in per_setting for r in results for k in r if k.endswith("]") and "[" in k})
    return list(metrics) + grouped


def summarize(job: EvalJob, per_setting: Sequence[list[dict]]) -> list[dict]:
    """One row per setting: each metric's mean over the items that carry it."""
    metrics = _summary_metrics(job, per_setting)
    rows = []
    for setting, results in zip(job.settings, per_setting):
        row = {"setting": setting.label, "spec": setting.spec, "n": len(results)}
        for m in metrics:
            values = [r[m] for r in results if r.get(m) is not None]
            row[m] = sum(values) / len(values) if values else float("nan")
        rows.append(row)
    return rows


def write_summary(job: EvalJob, out: Path) -> list[dict]:
    _, plotted = BENCHMARKS[job.benchmark]
    per_setting = collect_results(job, out)
    metrics = _summary_metrics(job, per_setting)
    rows = summarize(job, per_setting)
    _write_atomic(out / "results.json", json.dumps(
        [{"setting": s.label, "spec": s.spec, "items": r} for s, r in zip(job.settings, per_setting)]))
    _write_atomic(out / "summary.json", json.dumps(rows, indent=2))
    lines = ["| setting | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    lines += [f"| {r['setting']} | {r['n']} | " + " | ".join(f"{r[m]:.4f}" for m in metrics) + " |" for r in rows]
    _write_atomic(out / "summary.md", "\n".join(lines) + "\n")
    _plot(rows, plotted, out / "summary.png")
    return rows


def _plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    baseline = [r[metric] for r in rows if r["spec"] is None]
    if baseline:
        ax.axhline(baseline[0], color="grey", linestyle="--", label="none")
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["spec"] is not None:
            key = f"{r['spec'].get('method', 'iti')} ({r['spec'].get('pack')})"
            by_method.setdefault(key, []).append((float(r["spec"].get("alpha", 1.0)), r[metric]))
    for key, points in sorted(by_method.items()):
        points.sort()
        ax.plot([a for a, _ in points], [m for _, m in points], marker="o", label=key)
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
