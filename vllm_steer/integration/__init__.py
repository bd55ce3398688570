"""The one layer that touches vLLM internals. Everything else in vllm_steer speaks our own types.

``install()`` runs in every vLLM process (front-end, engine core, workers) through the
``vllm.general_plugins`` entry point; each patch is idempotent and inert for engines started
without ``additional_config["steering"]``.
"""

from __future__ import annotations


def install() -> None:
    from vllm_steer.integration import (
        engine_stats, frontend, openai_server, prefix_cache, scheduler, serve_flags, worker,
    )

    frontend.install()
    serve_flags.install()
    openai_server.install()
    prefix_cache.install()
    scheduler.install()
    worker.install()
    engine_stats.install()
