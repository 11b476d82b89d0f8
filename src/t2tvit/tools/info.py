"""What each registered variant is, measured by the package itself, beside the paper's numbers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import timm
import torch

from ..models import OFFICIAL_CLASSES, T2TViT, count_parameters, list_variants, load_checkpoint
from .paper import DESIGN_STUDY, or_dash
from .paper import PAPER_PARAMS_M as _TABLE4_PARAMS_M

# Parameter counts (millions) the paper gives: Table 4 for the family, Tables 6 and 7 for the design study.
PAPER_PARAMS_M: Dict[str, float] = {
    **{name: ref.params_m for name, ref in DESIGN_STUDY.items()}, **_TABLE4_PARAMS_M}


@dataclass
class VariantRow:
    name: str
    tokens: str
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int
    params_total: int
    params_trainable: int
    paper_params_m: Optional[float]

    @property
    def relative_diff(self) -> Optional[float]:
        if self.paper_params_m is None:
            return None
        return self.params_total / 1e6 / self.paper_params_m - 1


def variant_rows(with_tags: bool = True) -> List[VariantRow]:
    """Build every variant on the meta device (no memory, no init cost) and count its parameters."""
    names = timm.list_models('t2t*', include_tags=with_tags)
    names = [n for n in names if n.partition('.')[0] in set(list_variants())]
    rows = []
    for name in names:
        with torch.device('meta'):
            model: T2TViT = timm.create_model(name)
        total, trainable = count_parameters(model)
        base = name.partition('.')[0]
        attention_blocks = [b for b in model.blocks if hasattr(b, 'attn')]  # not the dense transitions
        rows.append(VariantRow(
            name=name, tokens=model.tokens_to_token.tokens_type, embed_dim=model.embed_dim,
            depth=len(attention_blocks), num_heads=attention_blocks[0].attn.num_heads, img_size=model.img_size[0],
            params_total=total, params_trainable=trainable,
            paper_params_m=PAPER_PARAMS_M.get(base) if model.img_size == (224, 224) and model.num_classes == 1000
            else None,
        ))
    return rows


def format_variant_table(rows: List[VariantRow]) -> str:
    width = max([24] + [len(r.name) + 2 for r in rows])
    header = (f"{'model':<{width}}{'tokens':<13}{'dim':>5}{'depth':>6}{'heads':>6}{'img':>5}"
              f"{'total':>12}{'trainable':>12}{'paper (M)':>11}{'diff':>8}")
    lines = [header, '-' * len(header)]
    for r in rows:
        lines.append(f'{r.name:<{width}}{r.tokens:<13}{r.embed_dim:>5}{r.depth:>6}{r.num_heads:>6}{r.img_size:>5}'
                     f'{r.params_total:>12,}{r.params_trainable:>12,}{or_dash(r.paper_params_m, ".1f"):>11}'
                     f'{or_dash(r.relative_diff, "+.1%"):>8}')
    lines.append("total = parameters + frozen buffers (pos_embed, Performer w), as the paper counts; "
                 "trainable = what the optimizer updates")
    return '\n'.join(lines)


@dataclass
class FixtureRow:
    name: str
    file: str
    pre_logits_max_abs_diff: float
    logits_max_abs_diff: float


def verify_official_fixtures(
        official_dir: Path, classes: Optional[Dict[str, Callable[..., T2TViT]]] = None) -> List[FixtureRow]:
    """Load each official fixture checkpoint and compare with the outputs the official code wrote.

    `classes` maps the official class name to ours (default: all four official classes); fixtures of classes not
    in it are skipped.
    """
    classes = classes or OFFICIAL_CLASSES
    official_dir = Path(official_dir)
    configs = json.loads((official_dir / 'tiny_configs.json').read_text())
    rows = []
    for name, config in configs.items():
        cls = classes.get(config['official_class'])
        if cls is None:
            continue
        io = torch.load(official_dir / f'{name}_io.pt', weights_only=True)
        for suffix in ('.pth.tar', '_ddp_raw.pth'):
            model = cls(**config['kwargs']).eval()
            load_checkpoint(model, official_dir / f'{name}{suffix}')
            with torch.no_grad():
                pre_logits = model.forward_head(model.forward_features(io['input']), pre_logits=True)
                logits = model.forward_head(model.forward_features(io['input']))
            rows.append(FixtureRow(
                name=name, file=f'{name}{suffix}',
                pre_logits_max_abs_diff=(pre_logits - io['pre_logits']).abs().max().item(),
                logits_max_abs_diff=(logits - io['logits']).abs().max().item(),
            ))
    return rows


def format_fixture_table(rows: List[FixtureRow], tolerance: float = 1e-5) -> str:
    header = f"{'official checkpoint':<40}{'pre_logits max|diff|':>22}{'logits max|diff|':>18}  ok"
    lines = [header, '-' * len(header)]
    for r in rows:
        ok = max(r.pre_logits_max_abs_diff, r.logits_max_abs_diff) <= tolerance
        lines.append(f'{r.file:<40}{r.pre_logits_max_abs_diff:>22.2e}{r.logits_max_abs_diff:>18.2e}  '
                     f'{"yes" if ok else "NO"}')
    return '\n'.join(lines)
