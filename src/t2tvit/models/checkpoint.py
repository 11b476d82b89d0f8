"""Reading T2T-ViT checkpoints as users have them, safely, and fitting them to a model.

A checkpoint file is untrusted input: `.pth`/`.pth.tar` files are read weights-only, allowing exactly the one
class that real training checkpoints carry (`argparse.Namespace`, in `args`); `.safetensors` files hold only
tensors. The model's module names are the official ones, so official files load as they are; the one layout that is
renamed is mmpretrain's (`backbone.`, `encoder.N`, `ln1`, `ffn.layers`, `head.layers.head`), mapped one to one.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv

from .layers import SOFT_SPLITS
from ..errors import InputError

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'NotACheckpointError', 'what_file_is', 'read_checkpoint',
    'read_weights', 'download_checkpoint', 'extract_state_dict', 'checkpoint_filter_fn',
    'load_checkpoint', 'mismatch_report', 'from_mmpretrain',
    'SAFE_GLOBALS', 'STATE_DICT_KEYS', 'EVAL_STATE_DICT_KEY',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, 'os.PathLike[str]']

SAFE_GLOBALS = [argparse.Namespace]
# Where a training checkpoint keeps its weights, in order of preference: EMA weights evaluate best. 'net': the
# official transfer_learning.py saves {'net': model.state_dict(), 'acc', 'epoch'} (the CIFAR release files).
STATE_DICT_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model', 'net')
# A t2tvit training checkpoint names which of its weight sets (state_dict or state_dict_ema) scored its recorded
# top-1, so that evaluating best.pth reads the weights that were chosen, raw or EMA.
EVAL_STATE_DICT_KEY = 'eval_state_dict'
_PREFIXES = ('module.', '_orig_mod.')  # DDP and torch.compile wrappers


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model; the message says which and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint file at the path given (nor, where tags are taken, a pretrained tag of that name)."""


class NotACheckpointError(CheckpointError):
    """The file is of another kind (text, an image, an archive): the message says which and what to give."""


# What torch's loader raises on a stream it cannot parse: the zip reader's errors, and whatever a malformed pickle
# trips in the weights-only unpickler (a missing memo entry is a KeyError, an empty stack an IndexError, ...).
_MALFORMED = (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError, TypeError, AttributeError,
              ValueError, OverflowError, struct.error)

# The first bytes of files people pass by mistake, and what they are.
_MAGIC = ((b'\x89PNG', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'), (b'GIF8', 'a GIF image'),
          (b'\x1f\x8b', 'gzip-compressed data'), (b'BZh', 'bzip2-compressed data'), (b'\xfd7zXZ', 'xz-compressed data'),
          (b'%PDF', 'a PDF document'), (b'\x7fELF', 'a program (ELF)'))


_CONTROL = bytes(b for b in range(32) if b not in b'\t\n\f\r\x1b')  # bytes text files do not hold


def _looks_like_text(head: bytes) -> bool:
    if head != head.translate(None, _CONTROL):
        return False
    try:
        head.decode('utf-8')
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # only a character cut at the end of what was read
    return True


def what_file_is(path: str) -> Optional[str]:
    """None when the file starts as `torch.save` writes (a zip archive, or a pickle in the legacy format); else
    what it is instead, in words ('a text file', 'a PNG image', 'an empty file')."""
    with open(path, 'rb') as f:
        head = f.read(4096)
    if head.startswith(b'PK\x03\x04') or head[:1] == b'\x80':
        return None
    if not head:
        return 'an empty file'
    if len(head) >= 10 and head[8:10] == b'{"':  # an 8-byte header length, then the JSON header
        return 'a safetensors file without the .safetensors suffix (rename it to end in .safetensors)'
    for magic, words in _MAGIC:
        if head.startswith(magic):
            return words
    if _looks_like_text(head):
        return 'a text file'
    return f"in no format torch.save writes (it starts with bytes {head[:4].hex(' ')})"


def read_checkpoint(path: PathLike) -> Any:
    """Load a checkpoint file without executing any pickled code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f'checkpoint {path!r} does not exist or is not a file')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e
    try:
        other = what_file_is(path)
    except OSError as e:
        raise CheckpointError(f'{path}: cannot be read ({e.strerror or e})') from e
    if other:
        raise NotACheckpointError(f'{path} is not a checkpoint: it is {other}; give a file saved with torch.save '
                                  f'(.pth, .pth.tar) or a .safetensors file')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'{path}: refused to unpickle it: it holds objects other than tensors and argparse.Namespace '
            f'({str(e).splitlines()[0]}). Re-save just the weights (torch.save(model.state_dict(), ...)) '
            f'or convert it to .safetensors') from e
    except _MALFORMED as e:
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint, truncated or corrupt '
                              f'({type(e).__name__}: {e})') from e


def download_checkpoint(
        url: str,
        cache_dir: Optional[PathLike] = None,
        progress: bool = True,
) -> Tuple[str, Any]:
    """Download `url` once into timm's cache (a progress bar on stderr) and read it weights-only.

    A cached file is used as it is, without the network. A download that does not read as a checkpoint (cut short,
    a web page, a pickle that would run code) is deleted from the cache, so the next call downloads it again.
    File names carrying a hash (`name-1a2b3c4d.pth`) are checked against it.
    """
    from timm.models._hub import download_cached_file
    try:
        path = download_cached_file(url, check_hash=True, progress=progress, cache_dir=cache_dir)
    except (OSError, RuntimeError, ValueError) as e:  # URLError/HTTPError are OSErrors; a bad hash a RuntimeError
        raise CheckpointError(
            f'could not download {url} ({type(e).__name__}: {e}); check the network or the url, or download it '
            f"yourself and pass pretrained_cfg_overlay=dict(file='PATH')") from e
    try:
        return path, read_checkpoint(path)
    except CheckpointError as e:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        raise CheckpointError(f'{url}: the downloaded file is not a usable checkpoint and was removed from the '
                              f'cache ({e}); run again to download it afresh') from e


def read_weights(source: PathLike, cache_dir: Optional[PathLike] = None) -> Tuple[str, Any]:
    """A checkpoint file, or the released weights of a pretrained tag (`t2t_vit_14.in1k`, downloaded once).

    Returns (where it came from, what `read_checkpoint` gives).
    """
    source = os.fspath(source)
    if os.path.exists(source):
        return source, read_checkpoint(source)
    import timm
    if source in timm.list_pretrained():
        path, raw = download_checkpoint(timm.models.get_pretrained_cfg(source).url, cache_dir=cache_dir)
        return f'{source} ({path})', raw
    raise CheckpointNotFoundError(f'{source!r} is neither a checkpoint file nor a pretrained tag; '
                            f"timm.list_pretrained('t2t*') lists the tags")


# mmpretrain's T2T_ViT inside its ImageClassifier -> ours: the same tensors under other names
_MMPRETRAIN_RENAMES = (
    (re.compile(r'^backbone\.'), ''),
    (re.compile(r'^encoder\.(\d+)\.'), r'blocks.\1.'),
    (re.compile(r'\.ln([12])\.'), r'.norm\1.'),
    (re.compile(r'\.ffn\.layers\.0\.0\.'), '.mlp.fc1.'),
    (re.compile(r'\.ffn\.layers\.1\.'), '.mlp.fc2.'),
    (re.compile(r'^head\.layers\.head\.'), 'head.'),
)


def from_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an mmpretrain (mmcls) T2T-ViT state dict to ours, one key to one key.

    `backbone.` goes, `encoder.N` -> `blocks.N`, `ln1`/`ln2` -> `norm1`/`norm2`, `ffn.layers.0.0`/`ffn.layers.1` ->
    `mlp.fc1`/`mlp.fc2` (in the T2T layers too), `head.layers.head` -> `head`. mmcv's EMAHook keeps a top-level
    `ema_<name>` buffer per parameter and swaps it with the parameter at the end of each epoch, before the checkpoint
    hook runs: the parameters saved are the EMA weights and the `ema_*` buffers the raw ones, which are dropped.
    """
    out, raw = {}, []
    for key, value in state_dict.items():
        if key.startswith('ema_'):
            raw.append(key)
            continue
        for pattern, replacement in _MMPRETRAIN_RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    if raw:
        _logger.info(f'mmpretrain checkpoint: kept its parameters (EMA weights), dropped {len(raw)} ema_* buffers '
                     f'(the raw training weights)')
    return out


def extract_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The weights inside a checkpoint: the set it names as evaluated (`EVAL_STATE_DICT_KEY`, written by `t2tvit
    train`), else EMA first, then raw training weights, then a bare state dict; an mmpretrain layout (`backbone.`
    keys) is renamed to ours."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'expected a dict of tensors, got {type(checkpoint).__name__}')
    named = checkpoint.get(EVAL_STATE_DICT_KEY)
    for key in ((named,) if named in STATE_DICT_KEYS else ()) + STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f'entry {key!r} is a {type(value).__name__}, not a tensor; expected one of '
                f'{", ".join(STATE_DICT_KEYS)} or a bare state dict')
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = value
    if any(key.startswith('backbone.') for key in state_dict):
        state_dict = from_mmpretrain(state_dict)
    return state_dict


def _square_grid(num_tokens: int) -> tuple:
    side = int(round(num_tokens ** 0.5))
    if side * side != num_tokens:
        raise CheckpointError(
            f'pos_embed holds {num_tokens} grid positions, not a square grid; '
            f'build the model with the img_size it was trained at')
    return side, side


def _adapt_first_linear(
        state_dict: Dict[str, torch.Tensor], model: nn.Module, weight_key: str, norm_key: str) -> None:
    """Fit the first Linear (after the 7x7 unfold, channel-major) and its LayerNorm to the model's in_chans.

    One channel: the fold is exact for a grey image, i.e. the 1-channel model gives what the 3-channel model gives
    on that image repeated 3 times. The norm's per-channel scale moves into the Linear; its shift moves into the
    Linear's bias when there is one, otherwise into the norm's shift by least squares. Other channel counts follow
    timm's `adapt_input_conv` (cycle the channels, scale by old/new).
    """
    weight = state_dict[weight_key]
    out_features, in_features = weight.shape
    model_sd = model.state_dict()
    new_in = model_sd[weight_key].shape[1]
    k0 = getattr(model, 'soft_splits', SOFT_SPLITS)[0][0]
    kernel_area = k0 * k0
    old_chans, new_chans = in_features // kernel_area, new_in // kernel_area
    norm_w = state_dict[norm_key + '.weight'].float().reshape(old_chans, kernel_area)
    norm_b = state_dict[norm_key + '.bias'].float().reshape(old_chans, kernel_area)
    w = weight.float().reshape(out_features, old_chans, kernel_area)
    bias_key = weight_key[:-len('weight')] + 'bias'
    if new_chans == 1:
        new_w = (w * norm_w.unsqueeze(0)).sum(dim=1)  # (O, K): per-channel scales folded in
        shift = torch.einsum('ock,ck->o', w, norm_b)  # (O,): what the per-channel shifts add
        new_norm_w = torch.ones(1, kernel_area)
        if bias_key in state_dict:
            state_dict[bias_key] = (state_dict[bias_key].float() + shift).to(state_dict[bias_key].dtype)
            new_norm_b = torch.zeros(1, kernel_area)
        else:  # find b with new_w @ b ~= shift
            new_norm_b = torch.linalg.lstsq(new_w, shift.unsqueeze(1)).solution.reshape(1, kernel_area)
    else:
        conv = weight.float().reshape(out_features, old_chans, k0, k0)
        new_w = adapt_input_conv(new_chans, conv, base_chans=old_chans).reshape(out_features, new_chans, kernel_area)
        index = torch.arange(new_chans) % old_chans
        new_norm_w, new_norm_b = norm_w[index], norm_b[index]
    state_dict[weight_key] = new_w.reshape(out_features, -1).to(weight.dtype)
    state_dict[norm_key + '.weight'] = new_norm_w.reshape(-1).to(weight.dtype)
    state_dict[norm_key + '.bias'] = new_norm_b.reshape(-1).to(weight.dtype)


def _adaptable(weight: torch.Tensor, target: torch.Tensor, model: nn.Module) -> bool:
    """Same layer at another channel count: same outputs, inputs a whole number of k x k channels on both sides."""
    k0 = getattr(model, 'soft_splits', SOFT_SPLITS)[0][0]
    return (weight.ndim == 2 and weight.shape[0] == target.shape[0] and weight.shape[1] != target.shape[1]
            and weight.shape[1] % (k0 * k0) == 0 and target.shape[1] % (k0 * k0) == 0)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Fit a checkpoint to `model`: pick the weights, strip wrappers (and rename an mmpretrain layout), drop a Token
    Labeling `aux_head` (with a warning), resize `pos_embed`, adapt in_chans (the first Linear of the T2T module, or
    the first convolution of the convolution and patch tokenizers).

    Pure and idempotent: its output passed through it again comes back unchanged. Used by timm's
    `pretrained=True` loader and by `load_checkpoint`.
    """
    state_dict = extract_state_dict(state_dict)
    model_sd = model.state_dict()

    # Token Labeling (84.2_T2T_ViT_24.pth.tar) trains an extra per-token classifier, `aux_head`, beside `head`
    aux = [k for k in state_dict if k.startswith('aux_head.') and k not in model_sd]
    if aux:
        for key in aux:
            del state_dict[key]
        _logger.warning(f'dropped the Token Labeling auxiliary head ({", ".join(aux)}): it scores every patch token '
                        f'during training; the predictions here come from the class-token head alone')

    posemb = state_dict.get('pos_embed')
    target = model_sd.get('pos_embed')
    if posemb is not None and target is not None and posemb.shape != target.shape and posemb.ndim == 3 \
            and posemb.shape[-1] == target.shape[-1]:  # another grid, same width: resize; else report below
        num_prefix = getattr(model, 'num_prefix_tokens', 1)
        old_grid = _square_grid(posemb.shape[1] - num_prefix)
        new_grid = getattr(model, 'grid_size', None) or _square_grid(model_sd['pos_embed'].shape[1] - num_prefix)
        state_dict['pos_embed'] = resample_abs_pos_embed(
            posemb, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=num_prefix)

    for prefix, weight_name in (('tokens_to_token.attention1.', 'kqv.weight'),
                                ('tokens_to_token.attention1.', 'attn.qkv.weight')):
        key = prefix + weight_name
        if key in state_dict and key in model_sd and _adaptable(state_dict[key], model_sd[key], model):
            _adapt_first_linear(state_dict, model, key, prefix + 'norm1')
    for key in ('tokens_to_token.soft_split0.weight', 'tokens_to_token.proj.weight'):  # convolution, patch tokens
        weight, target = state_dict.get(key), model_sd.get(key)
        if weight is not None and target is not None and weight.ndim == target.ndim == 4 \
                and weight.shape[0] == target.shape[0] and weight.shape[2:] == target.shape[2:] \
                and weight.shape[1] != target.shape[1]:
            state_dict[key] = adapt_input_conv(target.shape[1], weight, base_chans=weight.shape[1]).to(weight.dtype)
    return state_dict


def mismatch_report(
        state_dict: Mapping[str, torch.Tensor], model: nn.Module, allow_missing: Sequence[str] = ()) -> Optional[str]:
    """None when `state_dict` fits `model` exactly; else every missing, unexpected and mis-shaped key, by name."""
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in state_dict and k not in allow_missing]
    unexpected = [k for k in state_dict if k not in model_sd]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
        for k, v in model_sd.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', mismatched)):
        if items:
            shown = items[:12] + ([f'... {len(items) - 12} more'] if len(items) > 12 else [])
            parts.append(f'{len(items)} {title}: ' + ', '.join(shown))
    return '; '.join(parts)


def load_checkpoint(
        model: nn.Module,
        path_or_state: Union[PathLike, Mapping[str, Any]],
        strict: bool = True,
) -> nn.Module:
    """Load a checkpoint file or dict into `model` in place, strictly by default, and return the model.

    Raises `CheckpointError` naming every missing, unexpected and mis-shaped key when it does not fit.
    """
    where = 'checkpoint'
    if isinstance(path_or_state, Mapping):
        raw = path_or_state
    else:
        where = os.fspath(path_or_state)
        raw = read_checkpoint(path_or_state)
    try:
        state_dict = checkpoint_filter_fn(raw, model)
    except CheckpointError as e:
        raise CheckpointError(f'{where}: {e}') from e
    if strict:
        report = mismatch_report(state_dict, model)
        if report:
            arch = raw.get('arch') if isinstance(raw, Mapping) and isinstance(raw.get('arch'), str) else None
            hint = f" (it says arch={arch!r})" if arch else ''
            name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
            raise CheckpointError(
                f'{where}{hint} does not fit {name}: {report}. Is it a checkpoint of another variant, '
                f'img_size or num_classes? Build the matching model, or use strict=False to load what fits')
    else:
        model_sd = model.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if k in model_sd and v.shape == model_sd[k].shape}
    model.load_state_dict(state_dict, strict=strict)
    return model
