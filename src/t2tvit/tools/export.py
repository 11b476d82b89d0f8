"""`t2tvit export`: a trained model as ONNX, TorchScript, a torch.export program, safetensors weights, or a Hugging
Face hub model folder (timm's `save_for_hf` layout plus a model card).

Every export is checked before it is written: the serialized file is loaded back (onnxruntime, `torch.jit.load`,
`torch.export.load`, a fresh `create_model`) and run at two batch sizes, and at a second image size where the
height and width are dynamic; its outputs must match the eager model's. Each file is written atomically, with a
JSON sidecar `FILE.json` (and the same facts inside the file) giving the preprocessing and class names, so it can
be run without this package.
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..engine.checkpointing import atomic_write
from ..engine.preflight import check_finite, check_outputs
from ..engine.restore import SAFETENSORS_METADATA_KEY, RestoredModel
from ..models import load_checkpoint, token_grid_size
from ..errors import InputError

__all__ = ['FORMATS', 'ExportError', 'ExportResult', 'export_model', 'min_dynamic_side', 'METADATA_KEY', 'HubExport',
           'export_hf', 'model_card']

# format -> file suffix
FORMATS = {'onnx': '.onnx', 'torchscript': '.pt', 'exported-program': '.pt2', 'safetensors': '.safetensors'}
SUFFIXES = dict(FORMATS, **{'onnx-int8': '.int8.onnx'})  # with the int8 ONNX of tools/quantize.py
ONNX_EXPORTERS = ('dynamo', 'legacy')
METADATA_KEY = 't2tvit'  # ONNX metadata_props key / extra file name stem holding the sidecar JSON
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'


class ExportError(InputError, ValueError):
    """An export that cannot be made or does not reproduce the model; the message says why and what to do."""


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    dynamic_batch: bool
    dynamic_hw: bool
    min_side: Optional[int]
    checks: List[Tuple[Tuple[int, ...], float]] = field(default_factory=list)  # (input shape, max |diff| vs eager)
    note: str = ''

    @property
    def max_abs_diff(self) -> float:
        return max((d for _, d in self.checks), default=float('nan'))


def min_dynamic_side(soft_splits) -> int:
    """Smallest side that leaves at least 2 tokens per side after every soft split.

    The exporter proves its shape formulas for grids of 2 or more: a 1-token side broadcasts differently and is
    where the traced graph's assumptions stop holding.
    """
    side = soft_splits[0][0] - 2 * soft_splits[0][2]
    while min(min(token_grid_size((side, side), k, soft_splits)) for k in (1, 2, 3)) < 2:
        side += 1
    return side


def _suffix_path(output: Optional[Union[str, Path]], name: str, fmt: str) -> Path:
    """The file an export writes: `output`, or NAME.SUFFIX in the folder `output` names ('exports/', with its
    slash, may not exist yet: `_write_export` makes it) or in the current folder."""
    path = Path(output) if output else Path(f'{name}{SUFFIXES[fmt]}')
    new_folder = str(output or '').endswith(('/', os.sep))
    if new_folder or path.is_dir():
        path = path / f'{name}{SUFFIXES[fmt]}'
    if not new_folder and not path.parent.is_dir():
        raise ExportError(f'folder {path.parent} does not exist; create it or choose another --output')
    return path


def _write_export(path: Path, data: bytes, sidecar_path: Path, sidecar: Dict[str, Any], what: str) -> None:
    """An export and its sidecar JSON, each written atomically, into a folder made only now (a refused or failed
    export leaves no folder behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data), what=what)
    atomic_write(sidecar_path, lambda f: f.write(json.dumps(sidecar, indent=1).encode()), what='export sidecar')


def _require(module: str, fmt: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ExportError(f'--format {fmt} needs the {module} package: pip install "t2tvit[export]"') from e


def _max_diff(a: Any, b: torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    return (a.float() - b.float()).abs().max().item()


# --- the four formats: each returns (file bytes, runner of the loaded file) ---------------------------------------

def _onnx_bytes(model: nn.Module, example: torch.Tensor, dynamic_hw: bool, min_side: int, exporter: str,
                opset: int, meta: str) -> bytes:
    onnx = _require('onnx', 'onnx')
    # dynamo (torch.export underneath) keeps the soft-split unfolds and the per-call position-table resize as
    # symbolic shape arithmetic, so one graph serves every batch size and every height/width >= min_side (checked
    # below). The legacy TorchScript-based exporter records the grid sizes and the resize as constants: its graph
    # takes any batch but only the export size (at other sizes onnxruntime fails or, worse, is silently wrong), so
    # it is kept only for a fixed size, where it exports much faster.
    # optimize=False: onnxscript's optimizer (0.7) rewrites `x + c` to `x` whenever c is within 1e-8 of zero, which
    # deletes the Performer's official 1e-8 epsilon; where the normaliser underflows (large queries and keys) the
    # outputs then differ by O(1). onnxruntime still applies its own graph optimizations when it loads the file.
    if exporter == 'dynamo':
        _require('onnxscript', 'onnx')
        batch = torch.export.Dim('batch', min=1)
        dims = {0: batch}
        if dynamic_hw:
            dims.update({2: torch.export.Dim('height', min=min_side), 3: torch.export.Dim('width', min=min_side)})
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=(dims,), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=opset, optimize=False, verbose=False)
        proto = program.model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}}, opset_version=opset)
        proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _onnx_runner(data: bytes) -> Optional[Callable[[torch.Tensor], Any]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(data, providers=['CPUExecutionProvider'])
    return lambda x: session.run(None, {INPUT_NAME: x.numpy()})[0]


def _torchscript_bytes(model: nn.Module, meta: str) -> bytes:
    scripted = torch.jit.script(model)  # the whole forward, token-grid arithmetic included: any batch size
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={f'{METADATA_KEY}.json': meta})
    return buffer.getvalue()


def _torchscript_runner(data: bytes) -> Callable[[torch.Tensor], Any]:
    module = torch.jit.load(io.BytesIO(data), map_location='cpu')
    return module


def _exported_program_bytes(model: nn.Module, example: torch.Tensor, meta: str) -> bytes:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={f'{METADATA_KEY}.json': meta})
    return buffer.getvalue()


def _exported_program_runner(data: bytes) -> Callable[[torch.Tensor], Any]:
    return torch.export.load(io.BytesIO(data)).module()


def _safetensors_bytes(model: nn.Module, meta: str) -> bytes:
    from safetensors.torch import save
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save(tensors, metadata={SAFETENSORS_METADATA_KEY: meta})


def _safetensors_runner(data: bytes, restored: RestoredModel) -> Callable[[torch.Tensor], Any]:
    import timm
    from safetensors.torch import load
    model = timm.create_model(restored.name, **restored.model_kwargs)
    load_checkpoint(model, load(data))
    return model.eval()


# --- export -------------------------------------------------------------------------------------------------------

def _sidecar(restored: RestoredModel, fmt: str, path: Path, dynamic_hw: bool, min_side: Optional[int]) -> Dict:
    pre = restored.preprocessing_facts()
    return {
        'format': fmt, 'file': path.name, 'model': restored.name, 'model_kwargs': restored.model_kwargs,
        'checkpoint': restored.checkpoint, 'input_name': INPUT_NAME, 'output_name': OUTPUT_NAME,
        'output': 'logits; softmax over the last axis gives class probabilities',
        'dynamic_batch': fmt != 'safetensors', 'dynamic_height_width': dynamic_hw,
        'min_side': min_side if dynamic_hw else None, 'preprocess': pre, 'classes': restored.classes,
        't2tvit_version': __version__, 'torch_version': torch.__version__,
    }


def _safetensors_config(restored: RestoredModel, pre: Dict[str, Any]) -> Dict[str, Any]:
    """The training-config facts `restore_model` reads, so a safetensors file rebuilds without --model."""
    p = restored.preprocess
    config = {'model': restored.name, 'model_kwargs': restored.model_kwargs, 'img_size': p['img_size'],
              'in_chans': p['in_chans'], 'mean': pre['mean'], 'std': pre['std'], 'crop_pct': p['crop_pct'],
              'interpolation': p['interpolation']}
    if restored.facts.get('dataset'):
        config['dataset'] = restored.facts['dataset']
    return {'config': config, 'classes': restored.classes}


def _check_format(fmt: str, onnx_exporter: str, dynamic_hw: Optional[bool]) -> bool:
    """Refuse a format, exporter or dynamic height/width that cannot work; returns whether height/width are dynamic."""
    if fmt not in FORMATS:
        raise ExportError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ExportError(f'unknown ONNX exporter {onnx_exporter!r}; choose one of {", ".join(ONNX_EXPORTERS)}')
    hw_capable = fmt == 'onnx' and onnx_exporter == 'dynamo'
    if dynamic_hw and not hw_capable:
        raise ExportError(f'{fmt if fmt != "onnx" else "the legacy ONNX exporter"} keeps height and width fixed; '
                          f'use --format onnx (dynamo exporter) for a graph that takes any image size')
    return hw_capable if dynamic_hw is None else dynamic_hw


def _check_inputs(model: nn.Module, dynamic_hw: bool, min_side: Optional[int], seed: int):
    """The export example and the inputs the written file is checked on: batch 1 and 3, and with dynamic
    height/width another size, not square, and the smallest allowed."""
    generator = torch.Generator().manual_seed(seed)
    chans, height, width = model.in_chans, *model.img_size
    example = torch.randn(2, chans, height, width, generator=generator)
    inputs = [torch.randn(1, chans, height, width, generator=generator),
              torch.randn(3, chans, height, width, generator=generator)]
    if dynamic_hw:
        inputs.append(torch.randn(2, chans, height + 16, max(width - 8, min_side), generator=generator))
        inputs.append(torch.randn(1, chans, min_side, min_side + 3, generator=generator))
    return example, inputs


def _serialize(restored: RestoredModel, model: nn.Module, fmt: str, example: torch.Tensor, dynamic_hw: bool,
               min_side: Optional[int], onnx_exporter: str, opset: int, sidecar: Dict[str, Any]):
    """(file bytes, a runner of the file as loaded back, or None where its runtime is missing)."""
    meta = json.dumps(sidecar)
    try:
        if fmt == 'onnx':
            data = _onnx_bytes(model, example, dynamic_hw, min_side, onnx_exporter, opset, meta)
            return data, _onnx_runner(data)
        if fmt == 'torchscript':
            data = _torchscript_bytes(model, meta)
            return data, _torchscript_runner(data)
        if fmt == 'exported-program':
            data = _exported_program_bytes(model, example, meta)
            return data, _exported_program_runner(data)
        data = _safetensors_bytes(model, json.dumps(_safetensors_config(restored, sidecar['preprocess'])))
        return data, _safetensors_runner(data, restored)
    except ExportError:
        raise
    except Exception as e:  # exporters raise many types; the user needs the message, not the stack
        raise ExportError(f'exporting {restored.name} as {fmt} failed: {type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""}') from e


def export_model(
        restored: RestoredModel,
        fmt: str,
        output: Optional[Union[str, Path]] = None,
        dynamic_hw: Optional[bool] = None,
        onnx_exporter: str = 'dynamo',
        opset: int = 18,
        tolerance: float = 1e-4,
        seed: int = 0,
        force: bool = False,
) -> ExportResult:
    """Export `restored.model` as `fmt`, check the written bytes against the eager model, write FILE and FILE.json.

    Args:
        fmt: 'onnx', 'torchscript', 'exported-program' or 'safetensors' (int8 ONNX: `tools.quantize.export_int8`).
        output: File or folder (default: MODEL_NAME.SUFFIX in the current folder).
        dynamic_hw: Any height/width (>= `min_dynamic_side`) besides any batch size. None: yes for ONNX through
            the dynamo exporter, the only format whose graph keeps them symbolic; asking it of another raises.
        onnx_exporter: 'dynamo' (default) or 'legacy' (TorchScript-based, fixed height/width).
        tolerance: Largest allowed |exported - eager| over the checks; a larger one raises and writes nothing.
        force: Replace FILE and FILE.json when they exist (the checkpoint read is never replaced).
    """
    dynamic_hw = _check_format(fmt, onnx_exporter, dynamic_hw)
    path = _suffix_path(output, restored.name, fmt)
    check_outputs([path, path.with_name(path.name + '.json')], [restored.checkpoint], force=force)
    model = copy.deepcopy(restored.model).cpu().eval()
    model.dynamic_img_size = model.dynamic_img_size or dynamic_hw  # resize the position table per call
    min_side = min_dynamic_side(model.soft_splits) if dynamic_hw else None
    sidecar = _sidecar(restored, fmt, path, dynamic_hw, min_side)
    example, checks_inputs = _check_inputs(model, dynamic_hw, min_side, seed)
    with torch.no_grad():
        check_finite(model(example), 'random inputs of the export size')
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # tracer and exporter chatter about constant shapes it was told about
        data, run = _serialize(restored, model, fmt, example, dynamic_hw, min_side, onnx_exporter, opset, sidecar)
        result = ExportResult(path, path.with_name(path.name + '.json'), fmt, fmt != 'safetensors', dynamic_hw,
                              min_side)
        if run is None:
            result.note = 'not checked: onnxruntime is not installed (pip install "t2tvit[export]")'
        else:
            for x in checks_inputs:
                result.checks.append((tuple(x.shape), _max_diff(run(x), model(x))))
    if result.max_abs_diff > tolerance:
        raise ExportError(
            f'the exported {fmt} model differs from the eager model by {result.max_abs_diff:.2e} > {tolerance:.0e} '
            f'({result.checks}); nothing was written. Report this with the model name and torch version')
    sidecar['checks'] = [{'input_shape': list(s), 'max_abs_diff': d} for s, d in result.checks]
    _write_export(path, data, result.sidecar, sidecar, what=f'{fmt} export')
    return result


# --- Hugging Face hub model folder ---------------------------------------------------------------------------------

HF_FILES = ('config.json', 'model.safetensors', 'README.md')
_CITATION = """@InProceedings{Yuan_2021_ICCV,
    author    = {Yuan, Li and Chen, Yunpeng and Wang, Tao and Yu, Weihao and Shi, Yujun and Jiang, Zi-Hang and Tay, Francis E.H. and Feng, Jiashi and Yan, Shuicheng},
    title     = {Tokens-to-Token ViT: Training Vision Transformers From Scratch on ImageNet},
    booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
    month     = {October},
    year      = {2021},
    pages     = {558-567}
}"""


@dataclass
class HubExport:
    folder: Path
    files: List[Path]
    checks: List[Tuple[Tuple[int, ...], float]]  # (input shape, max |reloaded - source|)

    @property
    def max_abs_diff(self) -> float:
        return max((d for _, d in self.checks), default=float('nan'))


def model_card(restored: RestoredModel, model: nn.Module) -> Dict[str, Any]:
    """timm's model card fields (`timm.models._hub.generate_readme`) for this model: what it is, its source file,
    the publisher's and any recorded accuracy, license, citation, how to load it."""
    from ..models import RELEASES, count_parameters
    cfg = model.pretrained_cfg
    release = RELEASES.get(restored.facts.get('release', ''))
    total, _ = count_parameters(model)
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {'Params (M)': f'{total / 1e6:.1f}', 'Image size': '{} x {}'.format(*model.img_size),
                        'Input channels': model.in_chans, 'Classes': model.num_classes},
        'Papers': {cfg.get('paper_name', 'Tokens-to-Token ViT'): 'https://arxiv.org/abs/2101.11986'},
        'Original': cfg.get('origin_url', 'https://github.com/yitu-opensource/T2T-ViT'),
    }
    if release:
        details['Dataset'] = release['dataset']
        details['Weights'] = f"{release['url']} ({release['trained']})"
        details['Accuracy'] = f"{release['dataset']} top-1 {release['top1']}% ({release['measured']})"
        license_name = release['license']
    else:
        details['Weights'] = f'converted from {os.path.basename(str(restored.checkpoint))}' if restored.checkpoint \
            else 'random initialisation (no checkpoint)'
        if restored.facts.get('dataset'):
            details['Dataset'] = restored.facts['dataset']
        license_name = 'other'  # whoever trained the checkpoint decides
    if restored.facts.get('recorded_top1') is not None:
        details['Recorded top-1'] = f"{restored.facts['recorded_top1']:.2f}% (stored in the source checkpoint)"
    name = release and restored.facts['release'] or restored.name
    usage = _card_usage(model.in_chans)
    return {
        'license': license_name,
        'description': f'{name}: a Tokens-to-Token ViT (T2T-ViT) image classifier, {model.num_classes} classes. '
                       f'Needs the `t2tvit` package, which registers the architecture with timm.',
        'details': details,
        'usage': usage,
        'citation': _CITATION,
    }


def _card_usage(in_chans: int) -> str:
    """The model card's loading snippets: timm, and transformers through its TimmWrapper. ORG/REPO, FOLDER and
    image.png are the placeholders a reader (and the test that runs the snippets) replaces."""
    mode = 'L' if in_chans == 1 else 'RGB'
    return (
        "With timm:\n\n"
        "```python\nimport timm\nimport t2tvit  # registers the T2T-ViT architectures with timm\n\n"
        "model = timm.create_model('hf-hub:ORG/REPO', pretrained=True).eval()  # or 'local-dir:FOLDER'\n"
        "config = timm.data.resolve_data_config({}, model=model)\n"
        "transform = timm.data.create_transform(**config)\n```\n\n"
        "With Hugging Face transformers (its TimmWrapper builds the model through timm):\n\n"
        "```python\nimport torch\nfrom PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
        "import t2tvit  # registers the T2T-ViT architectures with timm\n\n"
        "processor = AutoImageProcessor.from_pretrained('ORG/REPO')  # or a local folder\n"
        "model = AutoModelForImageClassification.from_pretrained('ORG/REPO').eval()\n"
        f"image = Image.open('image.png').convert('{mode}')\n"
        "with torch.no_grad():\n"
        "    logits = model(**processor(image, return_tensors='pt')).logits\n"
        "print(model.config.id2label[int(logits.argmax(-1))])\n```\n")


def _hub_config(folder: Path, classes: Optional[List[str]], num_classes: int) -> None:
    """Make timm's config.json one that transformers reads too: transformers' TimmWrapper passes `num_classes`
    itself (from the top-level key, which timm reads as well), so `model_args` must not repeat it; and without
    `label_names` it would name the classes after ImageNet's."""
    path = folder / 'config.json'
    config = json.loads(path.read_text())
    config.get('model_args', {}).pop('num_classes', None)
    if classes and len(classes) == num_classes:
        config['label_names'] = list(classes)
    else:  # transformers' own names for classes it is not told
        config['label_names'] = [f'LABEL_{i}' for i in range(num_classes)]
    path.write_text(json.dumps(config, indent=2))


def export_hf(
        restored: RestoredModel,
        output: Union[str, Path],
        tolerance: float = 1e-5,
        seed: int = 0,
        force: bool = False,
) -> HubExport:
    """Write a Hugging Face hub model folder in timm's layout: `config.json` (architecture, num_classes, model_args,
    pretrained cfg with the preprocessing), `model.safetensors` and a model card `README.md`.

    The folder is built beside `output`, loaded back with `timm.create_model('local-dir:...', pretrained=True)` and
    run on random inputs; only when the outputs match the source model within `tolerance` are the three files moved
    into `output` (other files there are kept). Any of the three that exists there already (a repository's own
    README.md, say) is replaced only with `force`, and never when it is the checkpoint read.
    """
    import shutil
    import tempfile
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ExportError(f'{output} is a file; --format hf writes a folder, choose another --output')
    check_outputs([output / name for name in HF_FILES], [restored.checkpoint], force=force)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(restored.model).cpu().eval()
    if not restored.facts.get('release'):  # the cfg's release notes, tag and license describe other weights
        for key in ('notes', 'tag', 'license', 'description'):
            model.pretrained_cfg.pop(key, None)
    pre = restored.preprocessing_facts()
    data_config = {'crop_pct': restored.preprocess['crop_pct'], 'interpolation': restored.preprocess['interpolation'],
                   'mean': tuple(pre['mean']), 'std': tuple(pre['std'])}
    model_args = {k: v for k, v in restored.model_kwargs.items() if k != 'pretrained_cfg_overlay'}
    tmp = Path(tempfile.mkdtemp(prefix=f'.{output.name}.', dir=output.parent))
    try:
        try:
            save_for_hf(model, tmp, model_args=model_args, safe_serialization=True, data_config=data_config)
        except (ValueError, TypeError) as e:
            raise ExportError(f'cannot describe {restored.name} for the hub: {e}') from e
        _hub_config(tmp, restored.classes, model.num_classes)
        card = model_card(restored, model)
        (tmp / 'README.md').write_text(generate_readme(card, restored.facts.get('release') or restored.name))
        checks = _check_hub_folder(tmp, model, seed)
        worst = max(d for _, d in checks)
        if worst > tolerance:
            raise ExportError(f'the hub folder reloads to a model that differs by {worst:.2e} > {tolerance:.0e}; '
                              f'nothing was written. Report this with the model name and timm version')
        output.mkdir(exist_ok=True)
        files = []
        for name in HF_FILES:
            with open(tmp / name, 'rb') as f:
                os.fsync(f.fileno())
            os.replace(tmp / name, output / name)
            files.append(output / name)
        return HubExport(output, files, checks)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_hub_folder(folder: Path, model: nn.Module, seed: int) -> List[Tuple[Tuple[int, ...], float]]:
    import timm
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    generator = torch.Generator().manual_seed(seed)
    checks = []
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, model.in_chans, *model.img_size, generator=generator)
            checks.append((tuple(x.shape), _max_diff(loaded(x), model(x))))
    return checks
