"""vLLM general-plugin entry point (``vllm.general_plugins`` → ``vllm_steer.plugin:register``)."""

from __future__ import annotations


def register() -> None:
    from vllm_steer.integration import install

    install()
