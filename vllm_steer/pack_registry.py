"""The packs one engine has loaded, and the check of a request's spec against them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath

from vllm_steer.config import SteeringConfig
from vllm_steer.engine.probe_table import ProbeTable
from vllm_steer.errors import ConfigError, PackError, SpecError
from vllm_steer.pack import ModelShape, SteerPack, load_pack
from vllm_steer.spec import ConditionRequest, Steering, SteeringSpec, clip, for_each_member


def without_paths(value):
    """``value`` (a pack's free-form metadata) with every absolute file path cut to its file name:
    a client may learn what a pack was fitted on, not where files lie on the server."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~", "\\")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return PurePath(value.replace("\\", "/")).name
    return value


# The engine reads an L2S pack's input at the last prompt token it is given: for a chat request
# (LLM.chat, /v1/chat/completions) that is the end of the chat template's generation prompt, for a
# completion the prompt's own last token. A pack is fitted on one of the two (``l2s.prompt_format``);
# on the other kind of request it is still applied, on a token it was not fitted on.
PROMPT_FORMAT_NOTES = {
    "raw": "fitted on raw prompts (for chat requests it reads the end of the chat template, not what it "
           "was fitted on)",
    "chat": "fitted through the chat template (for chat requests; on plain completions it reads a token "
            "it was not fitted on)",
}


def steered_layers(spec: SteeringSpec, pack: SteerPack) -> tuple[set[int], set[int]]:
    """(head layers, residual layers) where a spec with fixed rows (ITI, residual, Mean-S) adds something."""
    if spec.method == "iti":
        return {l for l, h in pack.selected_heads if (spec.layers is None or l in spec.layers)
                and (spec.heads is None or (l, h) in spec.heads)}, set()
    if spec.method == "residual":
        return set(), {l for l in pack.residual_layers.tolist() if spec.layers is None or l in spec.layers}
    if spec.method == "mean_s":
        return set(), {pack.manifest.l2s.steer_layer}
    return set(), set()


@dataclass
class PackRegistry:
    model: ModelShape
    packs: dict[str, SteerPack] = field(default_factory=dict)
    # every layer gets the head (with probes) and residual ops, so packs may come and go while serving
    live: bool = False

    @classmethod
    def from_config(cls, config: SteeringConfig, model: ModelShape) -> PackRegistry:
        registry = cls(model=model, live=config.live_packs)
        for path in config.pack_paths():
            registry.add(load_pack(path, model=model))
        return registry

    def add_live(self, pack: SteerPack) -> None:
        """Add a pack while serving (``check_live``)."""
        self.check_live(pack)
        self.add(pack)

    def check_live(self, pack: SteerPack) -> None:
        """Whether ``pack`` may be added while serving: it must fit, have a new name, and need no
        hook the engine lacks (an L2S predictor is placed at start-up only)."""
        pack.check_fits(self.model)
        if pack.name in self.packs:
            raise ConfigError(f"a pack named {pack.name!r} is loaded; remove it first to replace it", field="name")
        if not self.live:
            raise ConfigError("this engine was not started with live packs (steering.live_packs)",
                              field="steering.live_packs")
        for part, what in (("l2s", "an L2S predictor"), ("condition", "a CAST condition")):
            if getattr(pack.manifest, part) is not None:
                raise PackError(
                    f"pack {pack.name!r} has {what}, whose hook is placed at start-up only: load it with the "
                    "packs at start-up (ITI, residual and probe packs can be added live)",
                    field=part,
                )

    def remove(self, name: str) -> SteerPack:
        pack = self.packs.pop(name, None)
        if pack is None:
            raise self._unknown_pack(name)
        return pack

    def add(self, pack: SteerPack) -> None:
        pack.check_fits(self.model)
        if pack.name in self.packs:
            raise ConfigError(
                f"two steer packs are named {pack.name!r}: {self.packs[pack.name].source} and {pack.source}",
                field="steering.packs",
            )
        self.packs[pack.name] = pack

    @property
    def head_layers(self) -> list[int]:
        """Layers where some pack steers a head: only these get the head-steering op (every layer
        with live packs)."""
        if self.live:
            return list(range(self.model.num_layers))
        return sorted({l for p in self.packs.values() for l in p.head_layers.tolist()})

    @property
    def residual_layers(self) -> list[int]:
        """Layers where some pack adds to the residual stream (residual vectors, L2S, Mean-S)."""
        if self.live:
            return list(range(self.model.num_layers))
        layers = {l for p in self.packs.values() for l in p.residual_layers.tolist()}
        layers |= {p.manifest.l2s.steer_layer for p in self.l2s_packs}
        return sorted(layers)

    @property
    def probe_layers(self) -> list[int]:
        """Layers whose head op also probes (every layer with live packs)."""
        if self.live:
            return list(range(self.model.num_layers))
        return ProbeTable.layers_of(self.packs.values())

    def graph_key(self) -> dict:
        """Everything the model's traced graph and the steering buffers depend on: the layers with
        the head op, with the probing variant of it, with the residual op, the L2S read/steer layers,
        and each pack's content digest. It goes into ``additional_config``, which vLLM hashes into
        its compile-cache key, so a graph compiled for other packs is never reused."""
        return {
            "live": self.live,
            "head": self.head_layers,
            "probe": self.probe_layers,
            "residual": self.residual_layers,
            "l2s": sorted([p.manifest.l2s.read_layer, p.manifest.l2s.steer_layer] for p in self.l2s_packs),
            "condition": sorted(p.manifest.condition.layer for p in self.condition_packs),
            "packs": {name: pack.digest() for name, pack in sorted(self.packs.items())},
        }

    @property
    def l2s_packs(self) -> list[SteerPack]:
        return [p for p in self.packs.values() if p.manifest.l2s is not None]

    @property
    def condition_packs(self) -> list[SteerPack]:
        return [p for p in self.packs.values() if p.manifest.condition is not None]

    def condition_pack(self, condition: ConditionRequest) -> SteerPack:
        """The loaded pack holding ``condition``'s condition; SpecError naming ``steering.condition.pack``."""
        pack = self.packs.get(condition.pack)
        if pack is None:
            known = clip(", ".join(sorted(p.name for p in self.condition_packs)) or "none")
            raise SpecError(f"steering.condition.pack {clip(repr(condition.pack))} is not loaded (loaded condition "
                            f"packs: {known})", field="steering.condition.pack")
        if pack.manifest.condition is None:
            raise SpecError(f"steering.condition.pack {pack.name!r} holds no condition (a condition pack comes "
                            "from vllm-steer fit cast)", field="steering.condition.pack")
        return pack

    @staticmethod
    def _check_gated_positions(spec: SteeringSpec, pack: SteerPack, condition_pack: SteerPack) -> None:
        """With ``prompt_positions: last`` the last prompt token is gated in its own forward, so every
        layer the spec steers must come after the condition's read (the output of layer L - 1):
        heads of layers >= L, residual adds after layers >= L - 1."""
        if spec.prompt_positions != "last" or spec.method not in ("iti", "residual", "mean_s"):
            return
        layer = condition_pack.manifest.condition.layer
        heads, residual = steered_layers(spec, pack)
        early_heads = sorted(l for l in heads if l < layer)
        early_residual = sorted(l for l in residual if l < layer - 1)
        if early_heads or early_residual:
            where = (f"the heads of layer {early_heads[0]}" if early_heads
                     else f"the residual stream after layer {early_residual[0]}")
            raise SpecError(
                f"steering.prompt_positions: condition pack {condition_pack.name!r} reads the input of layer {layer}, "
                f"and this spec steers {where}, before that read, so the last prompt token cannot be gated in its "
                f"own forward; ask for prompt_positions 'none' (generated tokens only), or steer layers from {layer} "
                f"on (residual: after layers from {layer - 1} on)",
                field="steering.prompt_positions",
            )

    def resolve_all(self, spec: Steering) -> list[SteerPack | None]:
        """Each member's pack (one for a plain spec), each checked as ``resolve`` checks a spec; an
        error names the member (``steering[1].pack``)."""
        return for_each_member(spec, self.resolve)

    def resolve(self, spec: SteeringSpec) -> SteerPack | None:
        """Check ``spec`` against the loaded packs; returns its pack (None for method 'off')."""
        if spec.method == "off":
            if spec.pack is not None and spec.pack not in self.packs:
                raise self._unknown_pack(spec.pack)
            return None
        pack = self.packs.get(spec.pack)
        if pack is None:
            raise self._unknown_pack(spec.pack)
        if spec.condition is not None:
            self._check_gated_positions(spec, pack, self.condition_pack(spec.condition))
        if spec.method == "fasb":
            if "iti" not in pack.manifest.methods or not pack.manifest.has_probes:
                raise SpecError(
                    f"steering.method 'fasb' needs a pack with ITI heads and probes; pack {pack.name!r} "
                    f"offers {pack.manifest.methods}{' with probes' if pack.manifest.has_probes else ' without probes'}",
                    field="steering.method",
                )
        elif spec.method not in pack.manifest.methods:
            raise SpecError(
                f"steering.method {spec.method!r} is not in pack {pack.name!r} "
                f"(it offers {pack.manifest.methods})",
                field="steering.method",
            )
        if spec.method == "l2s":
            info = pack.manifest.l2s
            if info.read_layer > info.steer_layer and spec.prompt_positions != "none":
                raise SpecError(
                    f"pack {pack.name!r} reads L2S at layer {info.read_layer}, after its steer layer "
                    f"{info.steer_layer}: its vector exists only after the prefill, so it cannot steer the last "
                    f"prompt token; ask for steering.prompt_positions 'none' (generated tokens only)",
                    field="steering.prompt_positions",
                )
            return pack
        if spec.method == "mean_s":
            return pack
        method_layers = set(
            pack.head_layers.tolist() if spec.method in ("iti", "fasb") else pack.residual_layers.tolist()
        )
        if spec.layers is not None:
            missing = sorted(set(spec.layers) - method_layers)
            if missing:
                raise SpecError(
                    f"steering.layers {missing} are not steered by pack {pack.name!r} for method "
                    f"{spec.method!r} (it has layers {sorted(method_layers)})",
                    field="steering.layers",
                )
        if spec.heads is not None:
            missing = sorted(set(spec.heads) - set(pack.selected_heads))
            if missing:
                raise SpecError(
                    f"steering.heads {[list(h) for h in missing]} are not selected heads of pack "
                    f"{pack.name!r}",
                    field="steering.heads",
                )
            if spec.layers is not None and not any(l in spec.layers for l, _ in spec.heads):
                raise SpecError(
                    "steering.heads and steering.layers select no head in common", field="steering.heads"
                )
        return pack

    def methods_of(self, pack: SteerPack) -> list[str]:
        """The spec methods a request may ask of ``pack`` (its manifest's, plus FASB when it has ITI
        heads and probes)."""
        methods = list(pack.manifest.methods)
        if "iti" in methods and pack.manifest.has_probes:
            methods.append("fasb")
        return methods

    def describe(self) -> list[dict]:
        """What a client may know about the loaded packs (no file paths): name, methods, the model
        shape they fit, K, layers, probes, L2S layers and the fit record."""
        out = []
        for name in sorted(self.packs):
            pack = self.packs[name]
            manifest = pack.manifest
            out.append({
                "name": name,
                "methods": self.methods_of(pack),
                "model": manifest.model.model_dump(),
                "num_heads_selected": manifest.num_heads_selected,
                "head_layers": sorted(set(pack.head_layers.tolist())),
                "residual_layers": sorted(set(pack.residual_layers.tolist())),
                "has_probes": manifest.has_probes,
                "l2s": manifest.l2s.model_dump() if manifest.l2s is not None else None,
                "condition": manifest.condition.model_dump() if manifest.condition is not None else None,
                "metadata": without_paths(manifest.metadata),
            })
        return out

    def summary_lines(self) -> list[str]:
        """One line per pack for the start-up log: name, methods and layers."""
        lines = []
        for name in sorted(self.packs):
            pack = self.packs[name]
            l2s = pack.manifest.l2s
            lines.append(
                f"{name!r}: methods {self.methods_of(pack)}, head layers {sorted(set(pack.head_layers.tolist()))}, "
                f"residual layers {sorted(set(pack.residual_layers.tolist()))}"
                + (f", L2S reads layer {l2s.read_layer} and steers layer {l2s.steer_layer}; "
                   + PROMPT_FORMAT_NOTES[l2s.prompt_format] if l2s else "")
            )
        return lines

    def _unknown_pack(self, name: str | None) -> SpecError:
        known = clip(", ".join(sorted(self.packs)) or "none")
        return SpecError(f"steering.pack {clip(repr(name))} is not loaded (loaded: {known})", field="steering.pack")
