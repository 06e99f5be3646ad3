"""Gemma 4's vision tower and its projection into the target's embeddings: mlx-vlm's modules
(`mlx_vlm.models.gemma4`), with only their weights read from the target's checkpoint.

The tower maps an image's pixels to one vector per 3 x 3 pool of patches; the projection
(`embed_vision`: a norm without scale, then a linear layer) maps those to the text model's
hidden size. transformers puts them in the prompt as they are, where the text embedding
would have been scaled by sqrt(hidden): see `Target.hidden`.
"""

import json
from collections import OrderedDict
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.nn as nn

from ..images import EXTRA, ImageError, Image

PREFIXES = ("vision_tower.", "embed_vision.")  # after an optional "model."
FEATURES_KEPT = 16  # images whose embeddings are kept


def _weights(path: Path) -> dict:
    """The tower's and projection's weights only, from the files that hold them."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({f for k, f in json.loads(index.read_text())["weight_map"].items()
                        if k.removeprefix("model.").startswith(PREFIXES)})
    else:
        files = [p.name for p in sorted(path.glob("model*.safetensors"))]
    out = {}
    for name in files:
        for key, value in mx.load(str(path / name)).items():
            key = key.removeprefix("model.")
            if key.startswith(PREFIXES):
                out[key] = value
    return out


class VisionTower(nn.Module):
    def __init__(self, config: dict, text_hidden: int):
        super().__init__()
        try:
            from mlx_vlm.models.gemma4.config import VisionConfig
            from mlx_vlm.models.gemma4.gemma4 import MultimodalEmbedder
            from mlx_vlm.models.gemma4.vision import VisionModel
        except ImportError:
            raise ImageError(f"images need the vision extra: {EXTRA}") from None
        vision = VisionConfig.from_dict(config)
        self.vision_tower = VisionModel(vision)
        self.embed_vision = MultimodalEmbedder(vision.hidden_size, text_hidden, eps=vision.rms_norm_eps)

    @classmethod
    def load(cls, path: Path, config: dict, text_hidden: int, dtype) -> "VisionTower":
        from ..checkpoints.loading import LoadError, read_config

        tower = cls(config, text_hidden)
        weights = _weights(path)
        if not weights:
            raise LoadError(f"{path}: the config has a vision tower but the weights have none")
        quantization = read_config(path).get("quantization")
        if quantization and any(k.endswith(".scales") for k in weights):  # a converter quantized it
            nn.quantize(tower, quantization["group_size"], quantization["bits"],
                        class_predicate=lambda p, m: f"{p}.scales" in weights)
        weights = {k: v for k, v in weights.items() if "rotary_emb" not in k
                   and not (k.startswith("vision_tower.") and k.endswith(("input_max", "input_min", "output_max", "output_min"))
                            and not config.get("use_clipped_linears", False))}
        try:
            tower.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise LoadError(f"{path}: cannot load the vision tower ({' '.join(str(e).split())})") from None
        # The tower runs in float32 where the checkpoint has it (mlx-vlm leaves it unquantized);
        # its output is cast to the target's dtype where it joins the prompt.
        mx.eval(tower.parameters())
        tower.dtype = dtype
        tower.kept = OrderedDict()  # digest -> embeddings
        return tower

    def __call__(self, images: List[Image]) -> List[mx.array]:
        """Per image, [soft tokens, text hidden] embeddings in the target's dtype; those of
        the last FEATURES_KEPT images (by the digest of their bytes) are kept, for an image
        read again: the n choices of one request, a conversation read anew."""
        out = []
        for image in images:
            features = self.kept.get(image.digest)
            if features is None:
                features = self.vision_tower(mx.array(image.pixels)[None])  # [1, 3, H, W] -> [1, n, D]
                features = self.embed_vision(features)[0].astype(self.dtype)  # [n, hidden]
                if features.shape[0] != image.soft_tokens:
                    raise ImageError(f"the vision tower gave {features.shape[0]} embeddings for "
                                     f"{image.soft_tokens} soft tokens")
                mx.eval(features)
                self.kept[image.digest] = features
                while len(self.kept) > FEATURES_KEPT:
                    self.kept.popitem(last=False)
            self.kept.move_to_end(image.digest)
            out.append(features)
        return out
