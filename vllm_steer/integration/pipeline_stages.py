"""Which decoder layers each pipeline-parallel stage runs, read from vLLM's own partition rule
(``get_pp_indices``, which also honours ``VLLM_PP_LAYER_PARTITION``), and what steering needs that
a stage split would break.

Under pipeline parallelism each stage holds the layers ``first..last-1`` and steers and probes only
those; the others are placeholders without attention. FASB's score is a mean over every probe, so
each stage adds its probes' sigmoid sums to the partial sum the previous stage sent and passes it on
with the hidden states (``PROBE_SUMS_KEY`` in the stage's IntermediateTensors); the last stage
completes it (``integration.worker``).
"""

from __future__ import annotations

from vllm_steer.pack_registry import PackRegistry

# The key of the FASB partial probe sums in the IntermediateTensors a stage sends to the next one.
PROBE_SUMS_KEY = "vllm_steer_probe_sums"


def stage_layer_ranges(num_layers: int, pp_size: int) -> list[range]:
    """The decoder layers of each pipeline stage, in stage order."""
    from vllm.distributed.utils import get_pp_indices

    return [range(*get_pp_indices(num_layers, rank, pp_size)) for rank in range(pp_size)]


def this_stage() -> tuple[int, int]:
    """(this process's pipeline-stage index, number of stages)."""
    from vllm.distributed import get_pp_group

    group = get_pp_group()
    return group.rank_in_group, group.world_size


def this_stage_layers(num_layers: int) -> range:
    """The decoder layers this process's pipeline stage runs (all of them without PP)."""
    rank, size = this_stage()
    return stage_layer_ranges(num_layers, size)[rank]


def stage_split_problems(registry: PackRegistry, num_layers: int, pp_size: int) -> list[str]:
    """What the loaded packs need that ``pp_size`` stages cannot give: an L2S pack's predictor runs
    on the stage of its read layer and writes the row that its steer layer adds, so both layers must
    be on one stage."""
    if pp_size <= 1:
        return []
    ranges = stage_layer_ranges(num_layers, pp_size)

    def stage_of(layer: int) -> int:
        return next(i for i, r in enumerate(ranges) if layer in r)

    problems = []
    for pack in registry.l2s_packs:
        info = pack.manifest.l2s
        read, steer = stage_of(info.read_layer), stage_of(info.steer_layer)
        if read != steer:
            problems.append(
                f"L2S pack {pack.name!r} reads layer {info.read_layer} (pipeline stage {read}) and steers "
                f"layer {info.steer_layer} (stage {steer}); with pipeline_parallel_size={pp_size} the stages "
                f"hold layers {[f'{r.start}-{r.stop - 1}' for r in ranges]}: both layers must be on one stage "
                "(set VLLM_PP_LAYER_PARTITION, or fit the pack with layers on one stage)"
            )
    for pack in registry.condition_packs:
        problems.append(
            f"condition pack {pack.name!r}: a CAST condition gates the steering of every layer from the stage of "
            f"its layer {pack.manifest.condition.layer}, which pipeline_parallel_size={pp_size} splits across "
            "processes; serve condition packs with pipeline_parallel_size=1"
        )
    return problems
