"""Steering vectors made by other tools, read into steer packs and written back out.

Every importer turns a foreign file into ``LayerVectors``: one vector per decoder layer, keyed by the
layer whose *output* it is added to (our residual steering's convention, ``residual.layer``), with a
note of how the file's own layer numbers were mapped. ``residual_pack`` builds the pack.
"""

IMPORT_FORMATS = ("auto", "gguf", "svec", "tensors", "sae")
EXPORT_FORMATS = ("gguf", "svec")
