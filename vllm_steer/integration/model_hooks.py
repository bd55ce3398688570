"""Put the steering op into a loaded vLLM model: at each steered layer's o_proj input and, for
residual steering, on each steered decoder layer's output.

The hooks only call ``torch.ops.vllm_steer.steer_probe`` on buffers registered on the module, so
their addresses are fixed and torch.compile / CUDA graphs see the same graph every step.
"""

from __future__ import annotations

import re

import torch
from torch import nn

import vllm_steer.ops  # noqa: F401  (registers torch.ops.vllm_steer.steer_probe)
from vllm_steer.engine.activation_capture import ActivationCapturer
from vllm_steer.engine.condition_gate import ConditionGate
from vllm_steer.engine.l2s_predictor import L2SPredictor
from vllm_steer.engine.probe_table import ProbeTable
from vllm_steer.engine.steering_table import SteeringTable
from vllm_steer.models.families import ModelFamily

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)$")


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Every module named ``...layers.N``, by N (a pipeline stage's other layers are placeholders)."""
    layers = {}
    for name, module in model.named_modules():
        m = _LAYER_NAME.search(name)
        if m:
            if int(m.group(1)) in layers:
                raise RuntimeError(f"vllm-steer: {type(model).__name__} has two modules named as decoder layer "
                                   f"{m.group(1)} (another stack of layers): not a layout vllm-steer steers")
            layers[int(m.group(1))] = module
    return layers


def out_proj_of(layer: nn.Module, family: ModelFamily) -> nn.Module | None:
    """The attention output projection of a decoder layer, where ``family`` says it is."""
    attention = getattr(layer, family.attention, None)
    projection = getattr(attention, family.out_proj, None) if attention is not None else None
    return projection if isinstance(projection, nn.Module) else None


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [tokens, width]: vLLM's own models pass [T, width]; its Transformers backend
    (families run through it, e.g. OLMo 2) passes [1, T, width]. A view, so in-place steering lands
    in ``x``."""
    return x.view(-1, x.shape[-1]) if x.dim() == 3 else x


def _steer_o_proj_input(module: nn.Module, args: tuple) -> None:
    torch.ops.vllm_steer.steer_probe(
        _token_rows(args[0]), module.vllm_steer_token_slots, module.vllm_steer_rows, None, None,
        module.vllm_steer_num_heads, module.vllm_steer_head_dim, module.vllm_steer_token_scales,
    )


def _steer_and_probe_o_proj_input(module: nn.Module, args: tuple) -> None:
    torch.ops.vllm_steer.steer_probe(
        _token_rows(args[0]), module.vllm_steer_token_slots, module.vllm_steer_rows, module.vllm_steer_probe_rows,
        module.vllm_steer_probe_out, module.vllm_steer_num_heads, module.vllm_steer_head_dim,
        module.vllm_steer_token_scales,
    )


def _steer_layer_output(module: nn.Module, args: tuple, output):
    hidden = _token_rows(output[0] if isinstance(output, tuple) else output)
    torch.ops.vllm_steer.steer_probe(
        hidden, module.vllm_steer_token_slots, module.vllm_steer_residual_rows, None, None,
        1, hidden.shape[-1], module.vllm_steer_token_scales,
    )
    return output


def _stream_parts(output) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM decoder layers return (hidden_states, residual); the residual stream is their sum."""
    if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
        return _token_rows(output[0]), _token_rows(output[1])
    hidden = _token_rows(output[0] if isinstance(output, tuple) else output)
    return hidden, torch.zeros_like(hidden)


def _l2s_predict_after_layer(module: nn.Module, args: tuple, output):
    hidden, residual = _stream_parts(output)
    for prefix in module.vllm_steer_l2s_prefixes:
        torch.ops.vllm_steer.l2s_predict(
            hidden, residual, getattr(module, prefix + "rows"), getattr(module, prefix + "slots"),
            getattr(module, prefix + "scales"), getattr(module, prefix + "w_in"), getattr(module, prefix + "b_in"), getattr(module, prefix + "w_out"),
            getattr(module, prefix + "out_rows"),
        )
    return output


def install_l2s_hooks(model: nn.Module, predictors: list[L2SPredictor], stage_layers: range,
                      family: ModelFamily) -> list:
    """The L2S predictors after their read layers (those of ``stage_layers``, the layers this process
    runs). Install before ``install_hooks`` so a predictor reads the stream before any residual
    steering added at the same layer (forward hooks run in the order they were registered): with
    L' = L* the predictor reads the unsteered stream after L*, writes its row, and the steering hook
    right after it adds that row in the same pass."""
    layers = checked_decoder_layers(model, stage_layers, family)
    handles = []
    by_layer: dict[int, list[L2SPredictor]] = {}
    for predictor in predictors:
        if predictor.read_layer in stage_layers:
            by_layer.setdefault(predictor.read_layer, []).append(predictor)
    for layer, group in by_layer.items():
        block = layers[layer]
        prefixes = []
        for i, predictor in enumerate(group):
            prefix = f"vllm_steer_l2s{i}_"
            for name in ("rows", "slots", "scales", "w_in", "b_in", "w_out", "out_rows"):
                block.register_buffer(prefix + name, getattr(predictor, name), persistent=False)
            prefixes.append(prefix)
        block.vllm_steer_l2s_prefixes = tuple(prefixes)
        handles.append(block.register_forward_hook(_l2s_predict_after_layer))
    return handles


_GATE_BUFFERS = ("token_rows", "sums", "finish_rows", "finish_slots", "finish_counts", "finish_thresholds",
                 "finish_above", "direction", "gates", "head_rows", "residual_rows")


def _condition_gate_after_layer(module: nn.Module, args: tuple, output):
    hidden, residual = _stream_parts(output)
    for prefix in module.vllm_steer_gate_prefixes:
        torch.ops.vllm_steer.condition_gate(hidden, residual, *(getattr(module, prefix + n) for n in _GATE_BUFFERS))
    return output


def install_condition_hooks(model: nn.Module, gates: list[ConditionGate], stage_layers: range,
                            family: ModelFamily) -> list:
    """The CAST gates after the decoder layer before each condition layer (its output is the condition
    layer's input). Install before ``install_hooks``: a residual steering op on that same layer then
    runs after the gate, so the gate reads the unsteered stream and the op already adds the gated row."""
    layers = checked_decoder_layers(model, stage_layers, family)
    by_layer: dict[int, list[ConditionGate]] = {}
    for gate in gates:
        if gate.layer - 1 in stage_layers:
            by_layer.setdefault(gate.layer - 1, []).append(gate)
    handles = []
    for layer, group in by_layer.items():
        block = layers[layer]
        prefixes = []
        for i, gate in enumerate(group):
            prefix = f"vllm_steer_gate{i}_"
            for name in _GATE_BUFFERS:
                block.register_buffer(prefix + name, getattr(gate, name), persistent=False)
            prefixes.append(prefix)
        block.vllm_steer_gate_prefixes = tuple(prefixes)
        handles.append(block.register_forward_hook(_condition_gate_after_layer))
    return handles


def checked_decoder_layers(model: nn.Module, stage_layers: range, family: ModelFamily) -> dict[int, nn.Module]:
    """The decoder layers of ``stage_layers`` (every layer, or a pipeline stage's), each checked
    against ``family``'s layout: a layer without the attention output projection where the family
    has it refuses the model, naming the layer and the path."""
    found = decoder_layers(model)
    layers = {i: found[i] for i in stage_layers if i in found}
    if sorted(layers) != list(stage_layers):
        raise RuntimeError(
            f"vllm-steer found decoder layers {sorted(found)} in {type(model).__name__}, expected "
            f"{stage_layers.start}..{stage_layers.stop - 1} (the {family.name} family's model.layers.N)"
        )
    for index, layer in layers.items():
        if out_proj_of(layer, family) is None:
            raise RuntimeError(
                f"vllm-steer: decoder layer {index} of {type(model).__name__} has no "
                f"{family.attention}.{family.out_proj} module, where the {family.name} family has its "
                "attention output projection: this checkpoint differs from the layout vllm-steer steers"
            )
    return layers


def install_capture_hooks(model: nn.Module, capturer: ActivationCapturer, stage_layers: range,
                          family: ModelFamily) -> list:
    """Eager-only hooks (they call Python every step): per-head o_proj input and residual stream."""
    handles = []
    for index, block in checked_decoder_layers(model, stage_layers, family).items():

        def read_heads(module, args, layer=index):
            capturer.record("heads", layer, _token_rows(args[0]))

        def read_stream(module, args, output, layer=index):
            hidden, residual = _stream_parts(output)
            capturer.record("residual", layer, hidden + residual)

        handles.append(out_proj_of(block, family).register_forward_pre_hook(read_heads))
        handles.append(block.register_forward_hook(read_stream))
    return handles


def install_hooks(model: nn.Module, table: SteeringTable, stage_layers: range, family: ModelFamily,
                  probes: ProbeTable | None = None) -> list:
    """Steering at every head/residual layer of the table that ``stage_layers`` (the layers this
    process runs) holds; at layers with probed heads the same op also writes the probe dots into
    ``probes.probe_out``."""
    layers = checked_decoder_layers(model, stage_layers, family)
    handles = []
    layout = table.layout
    for layer in (l for l in table.head_layers if l in stage_layers):
        o_proj = out_proj_of(layers[layer], family)
        o_proj.register_buffer("vllm_steer_token_slots", table.token_slots, persistent=False)
        o_proj.register_buffer("vllm_steer_rows", table.head_rows_of(layer), persistent=False)
        o_proj.register_buffer("vllm_steer_token_scales", table.token_scales, persistent=False)
        o_proj.vllm_steer_num_heads = layout.local_heads
        o_proj.vllm_steer_head_dim = layout.head_dim
        if probes is not None and probes.has_layer(layer):
            o_proj.register_buffer("vllm_steer_probe_rows", probes.rows_of(layer), persistent=False)
            o_proj.register_buffer("vllm_steer_probe_out", probes.out_of(layer), persistent=False)
            handles.append(o_proj.register_forward_pre_hook(_steer_and_probe_o_proj_input))
        else:
            handles.append(o_proj.register_forward_pre_hook(_steer_o_proj_input))
    for layer in (l for l in table.residual_layers if l in stage_layers):
        block = layers[layer]
        block.register_buffer("vllm_steer_token_slots", table.token_slots, persistent=False)
        block.register_buffer("vllm_steer_residual_rows", table.residual_rows_of(layer), persistent=False)
        block.register_buffer("vllm_steer_token_scales", table.token_scales, persistent=False)
        handles.append(block.register_forward_hook(_steer_layer_output))
    return handles
