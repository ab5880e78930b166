"""Dynamic semantic induction: concept embeddings from learned, support-conditioned prompts.

Each prompt is ``[SOT] v_1 .. v_n <state phrase>. [EOT]`` where ``v_i`` are learnable
context vectors in the text tower's input space (CoOp style) and the state phrase comes
from the compositional ensemble (for example "flawless magnetic tile"). A small
meta-network maps support statistics to one shift added to every context vector
(CoCoOp style). The frozen text tower encodes the prompts; the unit embeddings of a
state group are averaged into that group's concept. Shapes: ``C`` concepts (normal
groups first), ``D`` joint embedding width, ``W`` text tower width, ``T`` prompts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from h2vlr.prompt_ensemble import (
    ABNORMAL_STATE_GROUPS,
    NORMAL_STATE_GROUPS,
    encode_group_concepts,
    state_phrases,
)

if TYPE_CHECKING:
    from h2vlr.backbone import ClipBackbone
    from h2vlr.features import Features

logger = logging.getLogger(__name__)

CONTEXT_INIT = "a photo of a"  # initial context when n_context equals its token count
PLACEHOLDER = "X"  # one BPE token per context vector, replaced by the learned vectors


def support_statistics(features: Features) -> Tensor:
    """Summarise a support set for the meta-network; independent of the image order.

    Returns:
        ``[2 * D]``: the unit mean of the unit global embeddings, then the unit mean of
        the unit patch tokens over images, layers and patches.
    """
    global_mean = F.normalize(features.global_embeds.float(), dim=-1).mean(dim=0)
    patch_mean = F.normalize(features.patch_tokens.float(), dim=-1).mean(dim=(0, 1, 2))
    return torch.cat([F.normalize(global_mean, dim=0), F.normalize(patch_mean, dim=0)])


class PromptLearner(nn.Module):
    """Normal and abnormal concept embeddings, learned (dynamic) or from the static ensemble.

    Args:
        backbone: frozen CLIP backbone whose text tower encodes the prompts.
        class_name: category words, e.g. "magnetic tile".
        dynamic: learn context vectors and the meta-network; False returns the plain
            prompt ensemble (templates x states, mean per group) and has no parameters.
        n_context: number of context vectors.
    """

    def __init__(
        self, backbone: ClipBackbone, class_name: str, dynamic: bool = True, n_context: int = 4
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.dynamic = dynamic
        self.num_normal = len(NORMAL_STATE_GROUPS)
        self.num_concepts = self.num_normal + len(ABNORMAL_STATE_GROUPS)
        if not dynamic:
            normal = encode_group_concepts(backbone, NORMAL_STATE_GROUPS, class_name)
            abnormal = encode_group_concepts(backbone, ABNORMAL_STATE_GROUPS, class_name)
            self.register_buffer("static_concepts", torch.cat([normal, abnormal]))
            return

        prompts, groups = _learnable_prompts(class_name, n_context)
        token_ids = backbone.tokenize(prompts)
        _check_placeholders(backbone, token_ids, n_context)
        self.n_context = n_context
        self.register_buffer("token_ids", token_ids.to(backbone.device))
        self.register_buffer("prompt_group", torch.tensor(groups, device=backbone.device))
        self.register_buffer("token_embeds", backbone.token_embeddings(token_ids))  # [T, C, W]

        self.context = nn.Parameter(_initial_context(backbone, n_context))  # [n, W]
        stats_dim = 2 * backbone.embed_dim
        hidden = max(8, backbone.embed_dim // 16)
        self.meta_net = nn.Sequential(
            nn.Linear(stats_dim, hidden), nn.ReLU(), nn.Linear(hidden, backbone.text_width)
        )
        # A zero last layer starts every fit from the plain context; gradients still flow.
        nn.init.zeros_(self.meta_net[2].weight)
        nn.init.zeros_(self.meta_net[2].bias)

    def forward(self, support_stats: Tensor) -> Tensor:
        """Encode the concepts for a support set.

        Args:
            support_stats: ``[2 * D]`` from ``support_statistics``.

        Returns:
            ``[C, D]`` unit concept embeddings, the normal groups first.
        """
        if not self.dynamic:
            return self.static_concepts
        shift = self.meta_net(support_stats.to(self.context))  # [W]
        context = (self.context + shift).unsqueeze(0).expand(self.token_ids.shape[0], -1, -1)
        embeds = torch.cat(
            [
                self.token_embeds[:, :1],
                context,
                self.token_embeds[:, 1 + self.n_context :],
            ],
            dim=1,
        )
        text = F.normalize(encode_prompt_embeddings(self.backbone, embeds, self.token_ids), dim=-1)
        sums = text.new_zeros(self.num_concepts, text.shape[1]).index_add(
            0, self.prompt_group, text
        )
        return F.normalize(sums, dim=-1)  # the unit mean of each group


def encode_prompt_embeddings(backbone: ClipBackbone, embeds: Tensor, token_ids: Tensor) -> Tensor:
    """Encode input embeddings ``[T, C, W]`` like ``backbone.encode_text_embeddings``, faster.

    The text tower is causal, so the output at a position depends only on the positions
    before it. With end-of-text pooling the sequence can stop after the last end-of-text
    token: prompts of about 14 tokens then cost a fifth of the 77-token context. Other
    towers (no causal mask, or first/last-token pooling) go through the full context.

    Returns:
        ``[T, D]`` float32 text embeddings; gradients reach ``embeds`` only.
    """
    model = backbone.model
    pool_type = getattr(model, "text_pool_type", None)
    attn_mask = getattr(model, "attn_mask", None)
    if pool_type != "argmax" or attn_mask is None:
        return backbone.encode_text_embeddings(embeds, token_ids)

    token_ids = token_ids.to(backbone.device)
    length = int(token_ids.argmax(dim=-1).max()) + 1  # the end-of-text token has the top id
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeds[:, :length].to(backbone.device, cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=attn_mask[:length, :length])
    x = model.ln_final(x)  # [T, length, W]
    pooled = text_global_pool(x, token_ids[:, :length], pool_type)
    return (pooled @ model.text_projection).float()


def _learnable_prompts(class_name: str, n_context: int) -> tuple[list[str], list[int]]:
    """Return one prompt per state phrase and the concept (group) index of each."""
    prefix = " ".join([PLACEHOLDER] * n_context)
    prompts: list[str] = []
    groups: list[int] = []
    all_groups = [
        *state_phrases(NORMAL_STATE_GROUPS, class_name).values(),
        *state_phrases(ABNORMAL_STATE_GROUPS, class_name).values(),
    ]
    for group, phrases in enumerate(all_groups):
        for phrase in phrases:
            prompts.append(f"{prefix} {phrase}.")
            groups.append(group)
    return prompts, groups


def _check_placeholders(backbone: ClipBackbone, token_ids: Tensor, n_context: int) -> None:
    placeholder = backbone.tokenize([PLACEHOLDER])[0, 1]
    if not bool((token_ids[:, 1 : 1 + n_context] == placeholder).all()):
        raise ValueError(
            f"the tokenizer does not map {PLACEHOLDER!r} to one token per context vector; "
            "use a CLIP BPE tokenizer"
        )


def _initial_context(backbone: ClipBackbone, n_context: int) -> Tensor:
    """Embed ``CONTEXT_INIT`` when it has ``n_context`` tokens, else draw N(0, 0.02^2)."""
    token_ids = backbone.tokenize([CONTEXT_INIT])
    init_tokens = int((token_ids[0] != 0).sum()) - 2  # without start and end of text
    if init_tokens == n_context:
        return backbone.token_embeddings(token_ids)[0, 1 : 1 + n_context].clone()
    logger.debug("random context init: %d context vectors, %d init tokens", n_context, init_tokens)
    # Drawn on the CPU so that the caller's seeded CPU generator state decides the values.
    return (torch.randn(n_context, backbone.text_width) * 0.02).to(backbone.device)
