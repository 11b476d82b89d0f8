"""The paper's own numbers, to print beside what this package measures.

Source: Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet", ICCV 2021
(arXiv:2101.11986): Table 4 (the family), Table 6 ("CNN to T2T-ViT") and Table 7 (ablation of the T2T module and
of the deep-narrow structure). All top-1 numbers are ImageNet-1k validation at 224 px, trained from scratch; MACs
are the paper's, in G, per 224 px image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ['PaperResult', 'PAPER_PARAMS_M', 'PAPER_MACS_G', 'DESIGN_STUDY', 'PaperClaim', 'CLAIMS', 'or_dash']

# Parameter counts (millions) in Table 4; the paper counts the frozen tensors too.
PAPER_PARAMS_M: Dict[str, float] = {
    't2t_vit_7': 4.3, 't2t_vit_10': 5.9, 't2t_vit_12': 6.9,
    't2t_vit_14': 21.5, 't2t_vit_19': 39.2, 't2t_vit_24': 64.1,
    't2t_vit_t_14': 21.5, 't2t_vit_t_19': 39.2, 't2t_vit_t_24': 64.1,
}

# MACs (G) in Table 4 of the paper, at 224 px; the paper counts attention products too (convention `all`).
PAPER_MACS_G: Dict[str, float] = {
    't2t_vit_7': 1.1, 't2t_vit_10': 1.5, 't2t_vit_12': 1.8,
    't2t_vit_14': 4.8, 't2t_vit_19': 8.5, 't2t_vit_24': 13.8,
    't2t_vit_t_14': 6.1, 't2t_vit_t_19': 9.8, 't2t_vit_t_24': 15.0,
}


@dataclass(frozen=True)
class PaperResult:
    model: str  # the paper's name for it
    table: str
    top1: float  # ImageNet top-1, %
    params_m: float
    macs_g: float


# One row per idea of the design study, keyed by the registered model that implements it.
DESIGN_STUDY: Dict[str, PaperResult] = {
    # deep-narrow baseline (Tables 6 and 7) and the tokenizers (Table 7)
    't2t_vit_14': PaperResult('T2T-ViT-14', 'Tables 6, 7', 81.5, 21.5, 4.8),
    't2t_vit_t_14': PaperResult('T2T-ViT_t-14', 'Table 7', 81.7, 21.5, 6.1),
    't2t_vit_c_14': PaperResult('T2T-ViT_c-14', 'Table 7', 80.8, 21.3, 4.6),
    't2t_vit_p_14': PaperResult('T2T-ViT-14 without T2T', 'Table 7', 79.5, 21.1, 4.2),
    # shallow-wide: Table 7's T2T-ViT-d768-4 is the official t2t_vit_14_wide (768 wide, 4 blocks); Table 6's
    # "T2T-ViT-Wide" row (77.9%) lists depth 14 at width 768 with 25.1M params, which cannot both hold, so it is
    # left out
    't2t_vit_14_wide': PaperResult('T2T-ViT-d768-4', 'Table 7', 78.8, 25.0, 5.4),
    # CNN designs (Table 6)
    't2t_vit_dense': PaperResult('T2T-ViT-Dense', 'Table 6', 80.6, 23.7, 5.5),
    't2t_vit_14_se': PaperResult('T2T-ViT-SE', 'Table 6', 81.6, 21.9, 4.9),
    't2t_vit_14_resnext': PaperResult('T2T-ViT-ResNeXt', 'Table 6', 81.5, 21.5, 4.8),
    't2t_vit_16_ghost': PaperResult('T2T-ViT-Ghost', 'Table 6', 79.5, 16.3, 3.7),
}


@dataclass(frozen=True)
class PaperClaim:
    """One comparison of the design study: `variant` against `baseline`, as the paper measured it."""
    claim: str  # what the paper concludes, in words
    variant: str
    baseline: str = 't2t_vit_14'

    @property
    def paper_difference(self) -> float:
        """variant - baseline, ImageNet top-1 points, from the paper's own rows (DESIGN_STUDY)."""
        return round(DESIGN_STUDY[self.variant].top1 - DESIGN_STUDY[self.baseline].top1, 2)


# The conclusions of Tables 6 and 7 that the small-scale study can test; the direction and size of each come from
# DESIGN_STUDY, never from here.
CLAIMS = (
    PaperClaim('the T2T module beats a plain patch tokenizer', 't2t_vit_p_14'),
    PaperClaim('the T2T module beats a convolution tokenizer', 't2t_vit_c_14'),
    PaperClaim('a deep-narrow backbone beats a shallow-wide one', 't2t_vit_14_wide'),
    PaperClaim('dense connections hurt', 't2t_vit_dense'),
    PaperClaim('SE channel attention changes little', 't2t_vit_14_se'),
    PaperClaim('more, thinner heads (ResNeXt) change nothing', 't2t_vit_14_resnext'),
    PaperClaim('Ghost operations cost accuracy', 't2t_vit_16_ghost'),
)


def or_dash(value: Optional[float], spec: str) -> str:
    """`value` formatted by `spec` for a table, or '-' where there is none (e.g. no paper figure at that size)."""
    return '-' if value is None else format(value, spec)
