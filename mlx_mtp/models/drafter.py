"""The Gemma 4 "assistant" MTP drafter (`model_type: gemma4_assistant`).

Every layer is KV-shared: queries only, cross-attending to the target's cached keys and
values (its last non-shared sliding / full layer). One step:

    x = pre_projection(concat(target_embed(token), carry))   # 2 * backbone -> hidden
    h = norm(layers(x))                                      # rope on queries only
    logits = head(h); carry = post_projection(h)             # hidden -> backbone

The decoder layers are mlx-lm's gemma4_text layers, which take `shared_kv` already.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text
from mlx_lm.models.base import BaseModelArgs

from .head import Candidates, ClusteredHead
from .target import SLIDING

# The reference drafter's sliding layers see the last W + 1 target positions (it builds a
# bidirectional |i - j| <= W mask and flips it): one more than the target's own window.
DRAFTER_SLIDING_EXTRA = 1


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: dict = field(default_factory=dict)
    backbone_hidden_size: int = 1536
    model_type: str = "gemma4_assistant"
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True
    # mlx-mtp extension: the drafter has the target's hidden size and no embedding of its
    # own; its head and token rows are the target's (tied) embedding, lent at load time.
    shares_target_embedding: bool = False


class DrafterModel(nn.Module):
    """The checkpoint's `model.*`: tied embedding, query-only layers, final norm."""

    def __init__(self, args: gemma4_text.ModelArgs, own_embedding: bool = True):
        super().__init__()
        if own_embedding:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [gemma4_text.DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Drafter(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        text = dict(args.text_config)
        text["num_kv_shared_layers"] = text["num_hidden_layers"]  # all layers share KV
        self.text_args = gemma4_text.ModelArgs.from_dict(text)
        hidden, backbone = self.text_args.hidden_size, args.backbone_hidden_size
        self.model = DrafterModel(self.text_args, own_embedding=not args.shares_target_embedding)
        self.pre_projection = nn.Linear(2 * backbone, hidden, bias=False)
        self.post_projection = nn.Linear(hidden, backbone, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = ClusteredHead(
                hidden,
                self.text_args.vocab_size,
                args.num_centroids,
                args.centroid_intermediate_top_k,
            )

    @property
    def layer_types(self):
        return self.text_args.layer_types[: self.text_args.num_hidden_layers]

    @property
    def vocab_size(self):
        return self.text_args.vocab_size

    def lend_embedding(self, embedding: nn.Module):
        """Use the target's embedding as the head (kept out of this module's parameters)."""
        self._lent_embedding = lambda: embedding

    @property
    def embedding(self) -> nn.Module:
        if self.args.shares_target_embedding:
            return self._lent_embedding()
        return self.model.embed_tokens

    def head(self, h: mx.array) -> Candidates:
        """[B, hidden] -> drafter logits over its candidate set."""
        if "masked_embedding" in self:
            return self.masked_embedding(h, self.embedding)
        return Candidates(self.embedding.as_linear(h))

    def __call__(self, token_embedding, carry, shared_kv: dict, masks: dict, position):
        """One draft step for B rows.

        token_embedding, carry: [B, 1, backbone]; shared_kv: kind -> (keys, values) from
        the target; masks: kind -> mask or None; position: the query's position (int or [B]).
        Returns (Candidates over [B, C], next carry [B, 1, backbone]).
        """
        x = self.pre_projection(mx.concatenate([token_embedding, carry], axis=-1))
        for layer, kind in zip(self.model.layers, self.layer_types):
            x, _, _ = layer(x, masks[kind], None, shared_kv=shared_kv[kind], offset=position)
        h = self.model.norm(x)
        return self.head(h[:, 0]), self.post_projection(h)

    def masks(self, shared_kv: dict, position) -> dict:
        """Masks built from positions. Full layers see the target positions before the
        query, sliding layers only the last W + 1 of them. shared_kv: kind -> (keys,
        values, first position); position and first position: ints for one row, else [B]
        (rows at their own positions: their buffers may hold entries past a row's own
        position, and start at positions of their own)."""
        out = {}
        window = self.text_args.sliding_window + DRAFTER_SLIDING_EXTRA
        for kind, (keys, _, first) in shared_kv.items():
            if isinstance(position, int):
                if kind != SLIDING or first >= position - window:
                    out[kind] = None  # the view holds exactly the visible positions
                    continue
                out[kind] = mx.arange(first, first + keys.shape[2]) >= position - window
                continue
            k_pos = first[:, None] + mx.arange(keys.shape[2])[None]  # [B, S]
            q_pos = position[:, None]  # [B, 1]
            visible = k_pos < q_pos
            if kind == SLIDING:
                visible = visible & (k_pos >= q_pos - window)
            out[kind] = visible[:, None, None, :]  # [B, 1, 1, S]
        return out

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            if k == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            if "rotary_emb" in k:
                continue
            if k.endswith("token_ordering"):
                v = v.astype(mx.int32)
            out[k] = v
        return out
