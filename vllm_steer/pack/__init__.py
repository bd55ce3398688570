"""Steer packs: the file format that carries steering directions, vectors and probes."""

from vllm_steer.pack.manifest import ModelShape, PackManifest
from vllm_steer.pack.steer_pack import SteerPack, build_pack, load_pack, load_pack_bytes, save_pack

__all__ = ["ModelShape", "PackManifest", "SteerPack", "build_pack", "load_pack", "load_pack_bytes", "save_pack"]
