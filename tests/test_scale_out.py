"""Scaling out without an engine: the steering config reaching the API-server processes vLLM spawns
(``--api-server-count`` / ``--data-parallel-size``), the start-up refusal of an API server without
it, the steering metrics summed over data-parallel engines and rendered from vLLM's Prometheus
multiprocess registry, and the Ray data-parallel backend refused by name where vLLM cannot place it.
The real multi-process servers are in ``test_scale_out_server.py``."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_steer.errors import ConfigError
from vllm_steer.pack import save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

VLLM = str(Path(sys.executable).parent / "vllm")


@pytest.fixture(scope="module")
def model_and_packs(tiny_model, tmp_path_factory):
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("scale_out_packs")
    save_pack(folder / "p.safetensors", random_pack(shape_of_checkpoint(model), "p", num_heads_selected=2))
    return model, folder


def _serve_parser():
    """vLLM's engine-argument parser with the plugin's flags (``AsyncEngineArgs.add_cli_args`` loads
    the plugins, as ``vllm serve``'s parser does)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def _as_a_spawned_api_server(pickled_args: bytes, answers) -> None:
    """What an API server process vLLM spawns does with the parent's namespace: a fresh interpreter
    (no plugin loaded yet), ``AsyncEngineArgs.from_cli_args(args)`` (vLLM's own, as it was looked up
    before the plugins load inside it), then ``create_engine_config()``."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs

        from vllm_steer.integration import frontend

        args = pickle.loads(pickled_args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        engine_args.create_engine_config()
        answers.put([sorted(registry.packs) for registry, _ in frontend.steering_engines()])
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        answers.put(f"{type(exc).__name__}: {exc}")


def test_the_steering_flags_reach_a_spawned_api_server(model_and_packs):
    model, packs = model_and_packs
    parser = _serve_parser()
    args = parser.parse_args(["--model", str(model), "--steering-plugin", "--steering-packs", str(packs),
                              "--steering-max-backtracks", "2", "--dtype", "float32", "--max-model-len", "128"])
    # at parse time the flags become additional_config["steering"], a field vLLM's from_cli_args copies
    assert args.additional_config["steering"] == {
        "packs_dir": str(packs), "limits": {"max_backtracks": 2, "max_backtrack_tokens": 64,
                                            "max_recomputed_tokens": 256}}
    # parsing into the same namespace again, and the plugin's own from_cli_args (below), change nothing
    again, _ = parser.parse_known_args(["--model", str(model), "--steering-plugin", "--steering-packs",
                                        str(packs), "--steering-max-backtracks", "2"], args)
    assert again.additional_config == args.additional_config
    from vllm_steer.integration.serve_flags import steering_config_from_flags

    assert steering_config_from_flags(args, args.additional_config) == args.additional_config

    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_as_a_spawned_api_server, args=(pickle.dumps(args), answers))
    child.start()
    child.join(timeout=240)
    answer = answers.get(timeout=5)
    assert answer == [["p"]], answer  # the child built its own registry with the pack


def test_flags_and_a_different_additional_config_steering_entry_still_conflict(model_and_packs):
    model, packs = model_and_packs
    with pytest.raises(SystemExit) as info:
        _serve_parser().parse_args(["--model", str(model), "--steering-plugin", "--steering-packs", str(packs),
                                    "--additional-config", '{"steering": {"packs_dir": "/elsewhere"}}'])
    assert info.value.code == 2


def test_an_api_server_without_a_registry_refuses_to_start(monkeypatch):
    from argparse import Namespace

    from vllm_steer.integration import frontend, openai_server

    monkeypatch.setattr(frontend, "_REGISTRIES", {})
    with pytest.raises(ConfigError) as info:
        openai_server.check_this_server_steers()
    assert info.value.field == "--steering-plugin"
    assert "built no steering pack registry" in str(info.value) and "additional_config['steering']" in str(info.value)

    class App:  # what build_app hands the endpoint-plugin hook
        class state:
            args = Namespace(steering_plugin=True, additional_config={})

    with pytest.raises(ConfigError):
        openai_server._attach_endpoint_plugins(lambda app, *a, **k: None, App())


def _engine(index: int, methods: dict, backtracks: int, slots: int, hist_counts: list[int], maximum: int) -> dict:
    bounds = [1, 2, 4, "+Inf"]
    cumulative, buckets = 0, []
    for bound, n in zip(bounds, hist_counts):
        cumulative += n
        buckets.append([bound, cumulative])
    return {"requests_by_method": methods, "probe_checks": 10 * index + 1, "backtracks": backtracks,
            "recomputed_tokens": 4 * backtracks, "failed_requests": 0, "backtracks_in_place": backtracks,
            "backtracks_by_preemption": 0, "kv_copies": index, "max_tokens_scheduled_after_backtrack": maximum,
            "recomputed_tokens_per_request": {"buckets": buckets, "sum": 4 * backtracks, "count": sum(hist_counts)},
            "slots_in_use": slots, "slots_total": 16, "l2s_predictions": index, "engine": index}


def test_engine_stats_of_data_parallel_engines_are_summed():
    from vllm_steer.integration.engine_stats import combine_engine_stats

    one = _engine(1, {"iti": 2, "fasb": 3}, backtracks=3, slots=1, hist_counts=[0, 0, 3, 0], maximum=1)
    zero = _engine(0, {"fasb": 1, "l2s": 4}, backtracks=1, slots=0, hist_counts=[0, 1, 0, 0], maximum=2)
    total = combine_engine_stats([one, {}, zero])  # an engine without steering answers {}
    assert total["requests_by_method"] == {"iti": 2, "fasb": 4, "l2s": 4}
    assert (total["backtracks"], total["recomputed_tokens"], total["probe_checks"]) == (4, 16, 12)
    assert (total["slots_in_use"], total["slots_total"], total["l2s_predictions"], total["kv_copies"]) == (1, 32, 1, 1)
    assert total["max_tokens_scheduled_after_backtrack"] == 2
    assert total["recomputed_tokens_per_request"] == {
        "buckets": [[1, 0], [2, 1], [4, 4], ["+Inf", 4]], "sum": 16, "count": 4}
    assert total["per_engine"] == [{"engine": 0, "requests": 5, "slots_in_use": 0},
                                   {"engine": 1, "requests": 5, "slots_in_use": 1}]
    assert combine_engine_stats([{}, {}]) == {}
    # one engine: the same numbers as that engine's own answer
    alone = combine_engine_stats([zero])
    assert {k: v for k, v in alone.items() if k != "per_engine"} == {k: v for k, v in zero.items() if k != "engine"}


def test_the_multiprocess_metrics_body_gets_the_steering_series_once(tmp_path, monkeypatch):
    """``--api-server-count`` > 1 makes vLLM render /metrics from a new multiprocess registry over
    PROMETHEUS_MULTIPROC_DIR, not the global registry: the steering series are appended to that body
    (gzip or not), once, beside the series other processes wrote, and not at all without steering."""
    import gzip

    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from vllm_steer.integration import engine_stats, openai_server

    # another process's counter, written to the shared folder as prometheus_client does
    code = "from prometheus_client import Counter; Counter('vllm:demo_requests', 'x').inc(3)"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
                                                                   "PATH": "/usr/bin:/bin"})
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    body = generate_latest(registry)
    assert b"vllm:demo_requests_total 3.0" in body
    collector = openai_server._COLLECTOR
    monkeypatch.setattr(collector, "enabled", False)
    monkeypatch.setattr(collector, "stats", {})
    assert openai_server.add_steering_series(body, None) == body  # no steering in this server: nothing

    stats = engine_stats.combine_engine_stats([
        _engine(0, {"iti": 2}, backtracks=1, slots=0, hist_counts=[0, 0, 1, 0], maximum=1),
        _engine(1, {"fasb": 3}, backtracks=2, slots=2, hist_counts=[0, 0, 2, 0], maximum=1)])
    monkeypatch.setattr(collector, "enabled", True)
    monkeypatch.setattr(collector, "stats", stats)
    text = openai_server.add_steering_series(body, None).decode()
    assert text.startswith(body.decode())
    for line in ('vllm_steer:requests_total{method="fasb"} 3.0', 'vllm_steer:requests_total{method="iti"} 2.0',
                 "vllm_steer:backtracks_total 3.0", "vllm_steer:slots_in_use 2.0", "vllm_steer:slots_total 32.0",
                 'vllm_steer:requests_per_engine_total{engine="0"} 2.0',
                 'vllm_steer:requests_per_engine_total{engine="1"} 3.0',
                 'vllm_steer:slots_in_use_per_engine{engine="1"} 2.0',
                 "vllm_steer:recomputed_tokens_per_request_count 3.0"):
        assert text.count(line + "\n") == 1, line
    assert openai_server.add_steering_series(text.encode(), None).decode() == text  # never twice
    zipped = openai_server.add_steering_series(gzip.compress(body), "gzip")
    assert gzip.decompress(zipped).decode() == text


def test_call_utility_all_asks_every_engine():
    """vLLM 0.26's data-parallel client has no call_utility_all_async: one call per engine."""
    import asyncio

    from vllm_steer.integration.compat import call_utility_all

    class Old:  # 0.26's DPLBAsyncMPClient: call_utility_async answers the first engine only
        core_engines = [b"\x00\x00", b"\x01\x00"]

        async def _call_utility_async(self, method, *args, engine):
            return {"engine": engine[0], "method": method}

        async def call_utility_async(self, method, *args):
            return (await self._call_utility_async(method, *args, engine=self.core_engines[0]))

    class New(Old):
        async def call_utility_all_async(self, method, *args):
            return [{"engine": e[0], "new": True} for e in self.core_engines]

    class Single:
        async def call_utility_async(self, method, *args):
            return {"engine": 0}

    assert asyncio.run(call_utility_all(Old(), "m")) == [{"engine": 0, "method": "m"}, {"engine": 1, "method": "m"}]
    assert asyncio.run(call_utility_all(New(), "m")) == [{"engine": 0, "new": True}, {"engine": 1, "new": True}]
    assert asyncio.run(call_utility_all(Single(), "m")) == [{"engine": 0}]


def test_ray_data_parallel_is_refused_by_name_where_vllm_cannot_place_it(model_and_packs):
    from vllm_steer.integration.compat import ray_data_parallel_problem

    problem = ray_data_parallel_problem("ray")
    if problem is None:
        pytest.skip("this vLLM platform has a Ray device resource: Ray data parallelism is not refused here")
    assert "ray_device_key" in problem and "--data-parallel-backend mp" in problem
    assert ray_data_parallel_problem("mp") is None
    model, packs = model_and_packs
    done = subprocess.run([VLLM, "serve", str(model), "--steering-plugin", "--steering-packs", str(packs),
                           "--data-parallel-size", "2", "--data-parallel-backend", "ray"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("vllm serve: error: --data-parallel-backend ray:"), done.stderr[-3000:]
    assert "ray_device_key" in lines[-1]
