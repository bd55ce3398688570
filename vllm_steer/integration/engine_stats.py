"""Steering counters of a running engine, gathered in its EngineCore process, and the start-up check
that every worker of a steering engine really steers.

``ENGINE_STATS_UTILITY`` is an EngineCore method that front-ends call as a vLLM utility
(``compat.call_utility_all(engine_client.engine_core, ENGINE_STATS_UTILITY)`` in the API server,
``llm.llm_engine.engine_core.call_utility(...)`` offline). It joins the scheduler's counters with
rank 0's worker counters, names the engine (``engine``: its data-parallel index) and says
``workers_checked``: how many worker ranks the start-up check (``check_workers_steer``) confirmed
in this engine. The result is an empty dict for an engine without steering.
``combine_engine_stats`` sums the answers of several data-parallel engines into one.

The check runs right after ``EngineCore._initialize_kv_caches``, not after ``EngineCore.__init__``:
in an EngineCore process that vLLM spawns (the default, offline and served), the plugin is loaded
inside ``EngineCore.__init__`` itself, so a wrapper of ``__init__`` installed then never runs for the
engine being built; ``_initialize_kv_caches`` is looked up on the instance later in the same
``__init__``, after the workers have loaded the model, so its wrapper runs in every process.
"""

from __future__ import annotations

from vllm_steer.config import steering_config_from
from vllm_steer.integration.patching import patch
from vllm_steer.integration.scheduler import scheduler_stats
from vllm_steer.integration.worker import STATS_RPC

ENGINE_STATS_UTILITY = "vllm_steer_engine_stats"
WORKERS_CHECKED_ATTR = "_vllm_steer_workers_checked"


def engine_stats(engine_core) -> dict:
    stats = scheduler_stats(engine_core.scheduler)
    if not stats:
        return {}
    ranks = engine_core.model_executor.collective_rpc(STATS_RPC)
    rank0 = ranks[0] if ranks else {}
    for key in ("slots_in_use", "slots_total", "l2s_predictions", "conditions_decided", "conditions_met"):
        stats[key] = rank0.get(key, 0)
    stats["workers_checked"] = getattr(engine_core, WORKERS_CHECKED_ATTR, 0)
    parallel = engine_core.vllm_config.parallel_config
    # data_parallel_index survives vLLM re-making a non-MoE DP rank an independent engine (rank 0 of 1)
    stats["engine"] = int(getattr(parallel, "data_parallel_index", None) or parallel.data_parallel_rank or 0)
    return stats


_MAX_KEYS = ("max_tokens_scheduled_after_backtrack",)


def combine_engine_stats(answers: list[dict]) -> dict:
    """One engine-stats dict for several data-parallel engines' answers (``engine_stats``): every
    counter, ``requests_by_method`` key, slot count and histogram bucket summed, maxima kept as the
    largest, and ``per_engine``: each engine's index with its steered requests and slots in use.
    Engines without steering (empty answers) are left out; no steering engine at all gives {}."""
    answers = [a for a in answers if a]
    if not answers:
        return {}
    total: dict = {"requests_by_method": {}, "per_engine": []}
    for answer in answers:
        for key, value in answer.items():
            if key == "requests_by_method":
                for method, n in value.items():
                    total[key][method] = total[key].get(method, 0) + n
            elif key == "recomputed_tokens_per_request":
                total[key] = _add_histograms(total.get(key), value)
            elif key in _MAX_KEYS:
                total[key] = max(total.get(key, 0), value)
            elif key not in ("engine", "per_engine") and isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
        total["per_engine"].append({
            "engine": answer.get("engine", len(total["per_engine"])),
            "requests": sum(answer.get("requests_by_method", {}).values()),
            "slots_in_use": answer.get("slots_in_use", 0),
        })
    total["per_engine"].sort(key=lambda e: e["engine"])
    return total


def _add_histograms(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b:
        return a or b
    bounds_a, bounds_b = [bound for bound, _ in a["buckets"]], [bound for bound, _ in b["buckets"]]
    if bounds_a != bounds_b:
        raise ValueError(f"engines report histograms with different buckets: {bounds_a} vs {bounds_b}")
    return {"buckets": [[bound, ca + cb] for (bound, ca), (_, cb) in zip(a["buckets"], b["buckets"])],
            "sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}


def check_workers_steer(engine_core) -> None:
    """Fail the engine's start-up unless every worker rank attached the steering hooks the front-end
    planned (a runner the plugin does not hook, e.g. Model Runner V2 forced by a config, would
    otherwise serve every request unsteered)."""
    config = steering_config_from(engine_core.vllm_config.additional_config)
    if config is None:
        return
    ranks = engine_core.model_executor.collective_rpc(STATS_RPC)
    for rank, stats in enumerate(ranks):
        if not stats:
            raise RuntimeError(
                f"vllm-steer: worker rank {rank} runs a model runner without the steering hooks (the plugin "
                "hooks vLLM's V1 GPUModelRunner and its CPU subclass; Model Runner V2 is not supported): "
                "refusing to serve requests unsteered"
            )
        if config.hooked_layers is not None and stats.get("hooked_layers") != config.hooked_layers:
            raise RuntimeError(
                f"vllm-steer: worker rank {rank} hooked layers {stats.get('hooked_layers')}, "
                f"the packs need {config.hooked_layers}"
            )
    setattr(engine_core, WORKERS_CHECKED_ATTR, len(ranks))


def _after_kv_caches(original, self, *args, **kwargs):
    kv_cache_config = original(self, *args, **kwargs)
    check_workers_steer(self)
    return kv_cache_config


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    setattr(EngineCore, ENGINE_STATS_UTILITY, engine_stats)
    patch(EngineCore, "_initialize_kv_caches")(_after_kv_caches)
