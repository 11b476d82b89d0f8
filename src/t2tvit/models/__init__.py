"""T2T-ViT models. Importing this package registers every variant in timm's registry."""
from .checkpoint import (
    CheckpointError, checkpoint_filter_fn, download_checkpoint, extract_state_dict, from_mmpretrain, load_checkpoint,
    mismatch_report, read_checkpoint, read_weights)
from .layers import (
    TokenPerformer, TokenTransformer, attention_weights, performer_features, sinusoid_table, token_grid_size)
from .blocks import DenseBlock, DenseTransition, GhostAttention, GhostMlp, SEAttention, TokenSE
from .t2t_vit import (
    BLOCK_TYPES, OFFICIAL_CLASSES, RELEASES, TOKENS_TYPES, ConvTokenizer, PatchTokenizer, T2TModule, T2TViT)
from .utils import count_parameters, list_variants

__all__ = [
    'CheckpointError', 'checkpoint_filter_fn', 'extract_state_dict', 'load_checkpoint', 'mismatch_report',
    'read_checkpoint', 'read_weights', 'download_checkpoint', 'from_mmpretrain', 'RELEASES',
    'TokenPerformer', 'TokenTransformer', 'attention_weights', 'performer_features', 'sinusoid_table',
    'token_grid_size', 'T2TModule', 'T2TViT',
    'ConvTokenizer', 'PatchTokenizer', 'BLOCK_TYPES', 'TOKENS_TYPES', 'OFFICIAL_CLASSES',
    'TokenSE', 'SEAttention', 'GhostAttention', 'GhostMlp', 'DenseBlock', 'DenseTransition',
    'count_parameters', 'list_variants',
]
