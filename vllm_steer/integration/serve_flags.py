"""``vllm serve MODEL --steering-plugin --steering-packs DIR``: the plugin's flags on vLLM's own parser.

vLLM builds the ``serve`` parser through ``AsyncEngineArgs.add_cli_args``, which loads the general
plugins before it calls ``EngineArgs.add_cli_args``; wrapping the latter adds our flag group.
``EngineArgs.from_cli_args`` copies only its dataclass fields, so it is wrapped too: there the flags
become ``additional_config["steering"]``, the one switch the rest of the plugin reads (the same
thing ``LLM(..., additional_config={"steering": {...}})`` sets offline).

On vLLM's parser a mistake in these flags is the parser's own error (one message naming the flag,
exit code 2) before anything starts (``check_when_parsed``): the flags' combination, the limits'
ranges, and the packs (a folder of readable packs with distinct names that fit a local model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vllm_steer.config import ADDITIONAL_CONFIG_KEY, SteeringConfig, steering_config_from
from vllm_steer.errors import ConfigError, SteeringError
from vllm_steer.integration.patching import patch
from vllm_steer.limits import OperatorLimits

PLUGIN_FLAG = "--steering-plugin"
PACKS_FLAG = "--steering-packs"
ADMIN_KEY_FLAG = "--steering-admin-key"
ADMIN_KEY_ENV = "VLLM_STEER_ADMIN_KEY"  # the same key, kept out of vLLM's start-up log of its arguments
MAX_PACK_FLAG = "--steering-max-pack-mib"
DEFAULT_MAX_PACK_MIB = 64
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
    group.add_argument(
        ADMIN_KEY_FLAG, metavar="KEY", default=None,
        help=f"Turn on POST/DELETE /v1/steering/packs (packs added and removed while serving), with KEY as "
        f"the bearer token they require. Every layer is hooked at start-up. Or set {ADMIN_KEY_ENV}, which "
        "stays out of the start-up log.",
    )
    group.add_argument(
        MAX_PACK_FLAG, metavar="N", type=int, default=None,
        help=f"Largest pack POST /v1/steering/packs accepts, in MiB (default {DEFAULT_MAX_PACK_MIB}).",
    )


def admin_key(args: Any) -> str | None:
    """The live-pack admin key: the flag's, else the environment's; None when live packs are off."""
    import os

    return getattr(args, _dest(ADMIN_KEY_FLAG), None) or os.environ.get(ADMIN_KEY_ENV) or None


def max_pack_bytes(args: Any) -> int:
    mib = getattr(args, _dest(MAX_PACK_FLAG), None)
    return (DEFAULT_MAX_PACK_MIB if mib is None else mib) << 20


def check_when_parsed(parser) -> None:
    """Make a mistake in the steering flags (or in ``--additional-config``'s steering entry)
    ``parser``'s own error, one message and exit code 2, once it has parsed a command line: the
    flags' combination and limits (``steering_config_from_flags``), then the packs (``check_packs``).
    argparse has no hook for this, so this parser instance's ``parse_known_args`` is wrapped; it is
    also what a parent parser calls for a subcommand such as ``vllm serve``."""
    parse_known_args = parser.parse_known_args

    def checked(args=None, namespace=None):
        namespace, rest = parse_known_args(args, namespace)
        if hasattr(namespace, _dest(PLUGIN_FLAG)):
            try:
                additional_config = getattr(namespace, "additional_config", None)
                from_flags = steering_config_from_flags(namespace, additional_config)
                config = steering_config_from(from_flags if from_flags is not None else additional_config)
                if config is not None:
                    check_packs(config, getattr(namespace, "model_tag", None) or getattr(namespace, "model", None),
                                flag=PACKS_FLAG if from_flags is not None else "--additional-config")
                    check_data_parallel_backend(namespace)
                if from_flags is not None:
                    # Every process that rebuilds the engine arguments from this namespace gets the
                    # steering config as a dataclass field: the API servers that ``--api-server-count``
                    # / ``--data-parallel-size`` spawn run vLLM's own ``from_cli_args`` (the plugin
                    # loads inside it), which copies only the fields.
                    namespace.additional_config = from_flags
            except SteeringError as exc:
                parser.error(str(exc))
        return namespace, rest

    parser.parse_known_args = checked


def check_packs(config: SteeringConfig, model: str | None, *, flag: str = PACKS_FLAG) -> None:
    """Raise ConfigError naming ``flag`` unless the config's packs load: readable, and, when ``model``
    is a local checkpoint folder, fitting it with distinct names, as the engine loads them
    (``PackRegistry.from_config``; the engine checks again at start-up, where it knows the model)."""
    from vllm_steer.pack import load_pack
    from vllm_steer.pack.hf_shape import shape_of_checkpoint
    from vllm_steer.pack_registry import PackRegistry

    shape = None
    if model and (Path(str(model)) / "config.json").is_file():
        try:
            shape = shape_of_checkpoint(model)
        except (OSError, ValueError, KeyError, AttributeError):
            shape = None  # a config vLLM will report itself
    try:
        if shape is not None:
            PackRegistry.from_config(config, shape)
        else:
            for path in config.pack_paths():
                load_pack(path)
    except SteeringError as exc:  # ConfigError, PackError
        message = str(exc).removeprefix("steering.packs_dir ") if flag == PACKS_FLAG else str(exc)
        raise ConfigError(f"{flag}: {message}", field=flag) from None


def steering_config_from_flags(args: Any, additional_config: dict | None) -> dict | None:
    """``additional_config`` with the steering config the flags ask for (None: flags not used)."""
    plugin = bool(getattr(args, "steering_plugin", False))
    packs_dir = getattr(args, "steering_packs", None)
    limits = {name: getattr(args, _dest(flag), None) for flag, name in LIMIT_FLAGS.items()}
    limits = {name: value for name, value in limits.items() if value is not None}
    max_pack = getattr(args, _dest(MAX_PACK_FLAG), None)
    if not plugin:
        given = [PACKS_FLAG] if packs_dir is not None else []
        given += [flag for flag, name in LIMIT_FLAGS.items() if name in limits]
        given += [flag for flag in (ADMIN_KEY_FLAG, MAX_PACK_FLAG) if getattr(args, _dest(flag), None) is not None]
        if given:
            raise ConfigError(f"{given[0]} needs {PLUGIN_FLAG}", field=given[0])
        return None
    if packs_dir is None:
        raise ConfigError(f"{PLUGIN_FLAG} needs {PACKS_FLAG} DIR: the folder of steer packs to serve",
                          field=PACKS_FLAG)
    steering: dict[str, Any] = {"packs_dir": str(packs_dir)}
    if max_pack is not None and not 1 <= max_pack <= 4096:
        raise ConfigError(f"{MAX_PACK_FLAG}: must be 1 to 4096 MiB, got {max_pack}", field=MAX_PACK_FLAG)
    if admin_key(args) is not None:
        servers = _api_servers(args)
        if servers > 1:
            raise ConfigError(
                f"{ADMIN_KEY_FLAG}: packs managed live need one API server (this command starts {servers}: "
                "--api-server-count or --data-parallel-size); each API server keeps its own list of packs, and "
                "a pack added through one would be unknown to the others",
                field=ADMIN_KEY_FLAG,
            )
        steering["live_packs"] = True
    elif max_pack is not None:
        raise ConfigError(f"{MAX_PACK_FLAG} needs {ADMIN_KEY_FLAG} (or {ADMIN_KEY_ENV})", field=MAX_PACK_FLAG)
    if limits:
        try:
            steering["limits"] = OperatorLimits(**limits).model_dump()
        except ValidationError as exc:
            err = exc.errors()[0]
            flag = next(f for f, n in LIMIT_FLAGS.items() if n == err["loc"][0])
            raise ConfigError(f"{flag}: {err['msg']}", field=flag) from None
    if additional_config and additional_config.get(ADDITIONAL_CONFIG_KEY) == steering:
        return dict(additional_config)  # already applied (``check_when_parsed`` puts it on the namespace)
    if additional_config and ADDITIONAL_CONFIG_KEY in additional_config:
        raise ConfigError(
            f"give the steering config either as --additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": ...}}' "
            f"or with {PLUGIN_FLAG}/{PACKS_FLAG}, not both",
            field=PLUGIN_FLAG,
        )
    return {**(additional_config or {}), ADDITIONAL_CONFIG_KEY: steering}


def _api_servers(args: Any) -> int:
    """How many API servers ``vllm serve`` starts with ``args``: --api-server-count, by default one
    per data-parallel engine."""
    count = getattr(args, "api_server_count", None)
    return int(count if count is not None else getattr(args, "data_parallel_size", 1) or 1)


def check_data_parallel_backend(args: Any) -> None:
    """Refuse, naming ``--data-parallel-backend``, a Ray data-parallel backend this vLLM build cannot
    place (``compat.ray_data_parallel_problem``: vLLM's CPU build has no Ray device to place engines
    on)."""
    from vllm_steer.integration.compat import ray_data_parallel_problem

    problem = ray_data_parallel_problem(getattr(args, "data_parallel_backend", None))
    if problem is not None:
        raise ConfigError(f"--data-parallel-backend ray: {problem}", field="--data-parallel-backend")


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
    check_when_parsed(parser)
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
