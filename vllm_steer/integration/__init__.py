"""The one layer that touches vLLM internals. Everything else in vllm_steer speaks our own types.

``install()`` runs in every vLLM process (front-end, engine core, workers) through the
``vllm.general_plugins`` entry point; each patch is idempotent and inert for engines started
without ``additional_config["steering"]``. It never raises into vLLM (vLLM calls general plugins
without a ``try``, so one exception would stop every engine, steering or not): a patch that fails is
recorded in ``compat`` and only steering engines refuse to start, naming it.
"""

from __future__ import annotations


def install() -> None:
    from vllm_steer.integration import compat

    try:
        from vllm_steer.integration import (
            engine_stats, frontend, live_packs, openai_server, prefix_cache, scheduler, serve_flags, worker,
        )
    except Exception as exc:  # noqa: BLE001 - a vLLM whose modules we cannot import at all
        compat.record("import of vllm_steer.integration", exc)
        _log_failures(compat)
        return
    # frontend first: it is what refuses steering engines when anything below failed
    for module in (frontend, serve_flags, openai_server, prefix_cache, scheduler, worker, engine_stats,
                   live_packs):
        try:
            module.install()
        except Exception as exc:  # noqa: BLE001
            compat.record(f"{module.__name__}.install", exc)
    _log_failures(compat)


def _log_failures(compat) -> None:
    if compat.install_failures:
        import logging

        logging.getLogger("vllm.vllm_steer").warning(
            "vllm-steer: %s. Engines without steering are unaffected; steering engines will refuse to start.",
            compat.unsupported_message(compat.install_failures),
        )
