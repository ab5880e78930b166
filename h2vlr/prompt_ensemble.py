"""The compositional prompt ensemble: state words x templates x category name.

States come in groups; H2VLR keeps one concept per group (4 normal, 4 abnormal by
default), while the zero-shot baselines mean-pool every prompt of a class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from h2vlr.backbone import ClipBackbone

# Each "{}" is replaced by the class name, e.g. "magnetic tile".
NORMAL_STATE_GROUPS: dict[str, tuple[str, ...]] = {
    "flawless": ("flawless {}", "{} without flaw"),
    "perfect": ("perfect {}", "intact {}"),
    "unblemished": ("unblemished {}", "clean {}"),
    "defect-free": ("{} without defect", "{} without damage"),
}
ABNORMAL_STATE_GROUPS: dict[str, tuple[str, ...]] = {
    "damaged": ("damaged {}", "{} with damage"),
    "broken": ("broken {}", "cracked {}"),
    "flawed": ("{} with flaw", "{} with a scratch"),
    "defective": ("{} with defect", "defective {}"),
}
# Each "{}" is replaced by a filled state phrase, e.g. "flawless magnetic tile".
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of the {} for visual inspection.",
    "an industrial photo of a {}.",
    "a photo of a {} for anomaly detection.",
)


def state_phrases(groups: dict[str, tuple[str, ...]], class_name: str) -> dict[str, list[str]]:
    """Fill the class name into every state of every group."""
    return {group: [state.format(class_name) for state in states] for group, states in groups.items()}


def group_prompts(groups: dict[str, tuple[str, ...]], class_name: str) -> dict[str, list[str]]:
    """Return, per state group, every template filled with every state phrase of the group."""
    phrases = state_phrases(groups, class_name)
    return {
        group: [template.format(phrase) for phrase in group_phrases for template in TEMPLATES]
        for group, group_phrases in phrases.items()
    }


# Text embeddings of a (backbone, prompt set) pair, reused by every job and method
# that a worker process runs: encoding 128 prompts costs seconds on a CPU.
_CONCEPT_CACHE: dict[tuple, torch.Tensor] = {}
_CONCEPT_CACHE_SIZE = 64


@torch.no_grad()
def encode_group_concepts(
    backbone: ClipBackbone, groups: dict[str, tuple[str, ...]], class_name: str
) -> torch.Tensor:
    """Encode one unit-norm concept per state group: the mean of its prompt embeddings.

    Results are memoised per process, keyed by the backbone identity and device, the
    groups and the class name.

    Returns:
        ``[G, D]`` float32, rows in the order of ``groups``.
    """
    key = (
        backbone.identity,
        str(backbone.device),
        tuple((name, states) for name, states in groups.items()),
        class_name,
    )
    cached = _CONCEPT_CACHE.get(key)
    if cached is not None:
        return cached.clone()

    concepts = []
    for prompts in group_prompts(groups, class_name).values():
        embeds = F.normalize(backbone.encode_text(backbone.tokenize(prompts)).float(), dim=-1)
        concepts.append(F.normalize(embeds.mean(dim=0), dim=-1))
    result = torch.stack(concepts)

    if len(_CONCEPT_CACHE) >= _CONCEPT_CACHE_SIZE:
        _CONCEPT_CACHE.pop(next(iter(_CONCEPT_CACHE)))
    _CONCEPT_CACHE[key] = result
    return result.clone()


@torch.no_grad()
def encode_class_prompts(backbone: ClipBackbone, class_name: str) -> torch.Tensor:
    """Encode the normal and the abnormal class embedding of the whole ensemble.

    Returns:
        ``[2, D]`` float32 unit vectors: row 0 normal, row 1 abnormal.
    """
    normal = encode_group_concepts(backbone, NORMAL_STATE_GROUPS, class_name).mean(dim=0)
    abnormal = encode_group_concepts(backbone, ABNORMAL_STATE_GROUPS, class_name).mean(dim=0)
    return F.normalize(torch.stack([normal, abnormal]), dim=-1)
