"""``vllm serve MODEL --steering-plugin --steering-packs DIR``: the plugin's flags on vLLM's own parser.

vLLM builds the ``serve`` parser through ``AsyncEngineArgs.add_cli_args``, which loads the general
plugins before it calls ``EngineArgs.add_cli_args``; wrapping the latter adds our flag group.
``EngineArgs.from_cli_args`` copies only its dataclass fields, so it is wrapped too: there the flags
become ``additional_config["steering"]``, the one switch the rest of the plugin reads (the same
thing ``LLM(..., additional_config={"steering": {...}})`` sets offline).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from vllm_steer.config import ADDITIONAL_CONFIG_KEY
from vllm_steer.errors import ConfigError
from vllm_steer.integration.patching import patch
from vllm_steer.limits import OperatorLimits

PLUGIN_FLAG = "--steering-plugin"
PACKS_FLAG = "--steering-packs"
# flag -> the OperatorLimits field it sets
LIMIT_FLAGS = {
    "--steering-max-backtracks": "max_backtracks",
    "--steering-max-backtrack-tokens": "max_backtrack_tokens",
    "--steering-max-recomputed-tokens": "max_recomputed_tokens",
}


def add_steering_flags(parser) -> None:
    group = parser.add_argument_group(
        "vllm-steer", "Per-request activation steering (ITI, residual, FASB, L2S) by the vllm-steer plugin."
    )
    group.add_argument(
        PLUGIN_FLAG, action="store_true", default=False,
        help="Turn steering on: requests may carry a 'steering' object (or flat steering_* vllm_xargs).",
    )
    group.add_argument(
        PACKS_FLAG, metavar="DIR", default=None,
        help="Load every *.safetensors steer pack in DIR at start-up, checked against the model. "
        "Requests name packs by their manifest name; no file outside DIR is ever read.",
    )
    for flag, name in LIMIT_FLAGS.items():
        info = OperatorLimits.model_fields[name]
        group.add_argument(flag, metavar="N", type=int, default=None,
                           help=f"Per-request limit: the {info.description} (default {info.default}).")


def steering_config_from_flags(args: Any, additional_config: dict | None) -> dict | None:
    """``additional_config`` with the steering config the flags ask for (None: flags not used)."""
    plugin = bool(getattr(args, "steering_plugin", False))
    packs_dir = getattr(args, "steering_packs", None)
    limits = {name: getattr(args, _dest(flag), None) for flag, name in LIMIT_FLAGS.items()}
    limits = {name: value for name, value in limits.items() if value is not None}
    if not plugin:
        given = [PACKS_FLAG] if packs_dir is not None else []
        given += [flag for flag, name in LIMIT_FLAGS.items() if name in limits]
        if given:
            raise ConfigError(f"{given[0]} needs {PLUGIN_FLAG}", field=given[0])
        return None
    if packs_dir is None:
        raise ConfigError(f"{PLUGIN_FLAG} needs {PACKS_FLAG} DIR: the folder of steer packs to serve",
                          field=PACKS_FLAG)
    if additional_config and ADDITIONAL_CONFIG_KEY in additional_config:
        raise ConfigError(
            f"give the steering config either as --additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": ...}}' "
            f"or with {PLUGIN_FLAG}/{PACKS_FLAG}, not both",
            field=PLUGIN_FLAG,
        )
    steering: dict[str, Any] = {"packs_dir": str(packs_dir)}
    if limits:
        try:
            steering["limits"] = OperatorLimits(**limits).model_dump()
        except ValidationError as exc:
            err = exc.errors()[0]
            flag = next(f for f, n in LIMIT_FLAGS.items() if n == err["loc"][0])
            raise ConfigError(f"{flag}: {err['msg']}", field=flag) from None
    return {**(additional_config or {}), ADDITIONAL_CONFIG_KEY: steering}


def _wire_the_server() -> None:
    """A server with steering must get its request and route hooks: patch the endpoint-plugin
    attach points again now that the API server module is surely imported, or refuse to start."""
    from vllm_steer.integration import openai_server

    if not openai_server.install():
        raise ConfigError(
            f"{PLUGIN_FLAG}: this vLLM's API server has no endpoint-plugin hook the plugin knows, so "
            "requests could not be steered", field=PLUGIN_FLAG,
        )


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_cli_args(original, parser, *args, **kwargs):
    parser = original(parser, *args, **kwargs)
    add_steering_flags(parser)
    return parser


def _from_cli_args(original, cls, args, *rest, **kwargs):
    engine_args = original(cls, args, *rest, **kwargs)
    config = steering_config_from_flags(args, getattr(engine_args, "additional_config", None))
    if config is not None:
        engine_args.additional_config = config
        _wire_the_server()
    return engine_args


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    patch(EngineArgs, "add_cli_args")(_add_cli_args)  # a staticmethod, kept one
    patch(EngineArgs, "from_cli_args")(_from_cli_args)  # a classmethod, kept one
