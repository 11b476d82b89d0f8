"""`t2tvit ablate`: the paper's design study (Tables 6 and 7) rerun on one small data set, one recipe, one budget.

Each variant is trained by the ordinary training engine into `OUTPUT/ablate-NAME/VARIANT` (so an interrupted
ablation resumes where it stopped), then measured the same way: parameters, MACs of one image, inference images/s
and top-1 on the validation (test) split. The results go to `results.json`, `results.md` and `results.png` beside
the runs, with the paper's ImageNet numbers for each idea printed next to ours for reference.

Small scale: the paper's models are built for 224 px ImageNet. For 28-32 px images every idea is built at one
common small scale (the `small_kwargs` of each entry of `ABLATION_VARIANTS`): the T2T-ViT-14 baseline becomes
128 wide and 4 blocks deep (4 heads, MLP ratio 2: the shape of `t2t_vit_mini`) with soft splits 7/3/3 at strides
2/2/2 and 32-wide tokens inside the T2T module, which leave a 4x4 grid at 28 px; each other variant changes only what
its idea changes.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn

from ..data import build_dataset
from ..data.datasets import STREAMING_DATASETS
from ..data.streaming import stored_source
from ..engine.config import ConfigError, resolve_config
from ..engine.distributed import pick_device
from ..models import count_parameters
from ..outputs import claim_all
from . import complexity
from .ablate_variants import (  # noqa: F401  (part of this module's interface)
    ABLATION_VARIANTS, DATASET_DEFAULTS, DEFAULT_EPOCHS, DEFAULT_VARIANTS, SMALL_BASE, AblationVariant)
from .paper import DESIGN_STUDY, PaperResult

__all__ = ['AblationVariant', 'ABLATION_VARIANTS', 'DEFAULT_VARIANTS', 'DATASET_DEFAULTS', 'VariantResult',
           'AblationResult', 'run_ablation', 'count_macs', 'images_per_second', 'write_tables']

_SET_BY_ABLATE = ('model', 'model_kwargs', 'run_name', 'output', 'pretrained')

MACS_CONVENTION = ('MACs = FLOPs / 2 from torch.utils.flop_counter over one forward pass of one image: matrix '
                   'products and convolutions, attention included (t2tvit.tools.complexity, convention "all"); '
                   'element-wise operations (norms, activations, the Ghost cheap operations, SE gating) are not '
                   'counted. This reproduces the paper\'s counts: T2T-ViT-14 at 224 px gives 4.78 G here, 4.8 G in '
                   'the paper; T2T-ViT_t-14 6.09 G and 6.1 G.')


@dataclass
class VariantResult:
    variant: str
    idea: str
    params_total: int
    params_trainable: int
    macs: int
    images_per_s: float
    top1: Optional[float]
    status: str  # 'finished', 'budget' (max_steps), 'diverged'
    global_step: int
    run_dir: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    paper: Optional[Dict[str, Any]] = None


@dataclass
class AblationResult:
    folder: Path
    results: List[VariantResult]
    setup: Dict[str, Any]
    files: List[Path]
    interrupted: bool = False


# --- measurements --------------------------------------------------------------------------------------------------

def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on an input of `input_size` (C, H, W), attention included (the
    paper's convention, `t2tvit.tools.complexity`); see MACS_CONVENTION."""
    return complexity.count_macs(model, tuple(input_size), device=str(next(model.parameters()).device))['all']


def images_per_second(model: nn.Module, input_size: Sequence[int], batch_size: int = 64, seconds: float = 3.0,
                      device: Optional[torch.device] = None) -> float:
    """Inference throughput: batches of random images after two warm-up batches, timed for about `seconds`."""
    device = device or next(model.parameters()).device
    model.eval()
    x = torch.randn(batch_size, *input_size, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        sync()
        images, start = 0, time.perf_counter()
        while True:
            model(x)
            images += batch_size
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and images >= 3 * batch_size:
                return images / elapsed


# --- the run ---------------------------------------------------------------------------------------------------------

def _check_variants(variants: Sequence[str]) -> List[str]:
    chosen = list(dict.fromkeys(v.strip() for v in variants if v.strip()))
    if not chosen:
        raise ConfigError(f'no variants given; choose from: {", ".join(ABLATION_VARIANTS)}')
    unknown = [v for v in chosen if v not in ABLATION_VARIANTS]
    if unknown:
        raise ConfigError(f'unknown variant(s) {", ".join(unknown)}; the ablation knows {", ".join(ABLATION_VARIANTS)} '
                          f'(pass them comma-separated to --variants)')
    return chosen


def _model_kwargs(variant: str, scale: str) -> Dict[str, Any]:
    if scale == 'paper':
        return {}
    kwargs = dict(ABLATION_VARIANTS[variant].small_kwargs)
    if 'soft_splits' in kwargs:  # as YAML-friendly lists, the way the run's config.yaml stores them
        kwargs['soft_splits'] = [list(split) for split in kwargs['soft_splits']]
    if 'block_config' in kwargs:
        kwargs['block_config'] = list(kwargs['block_config'])
    return kwargs


def _top1_of_run(config: Dict[str, Any], run_dir: Path, result, log: Callable[[str], None]) -> float:
    """The final weights' top-1: from the run's own last evaluation, or (budget stop, resumed run) by evaluating
    last.pth; cached per global step so a rerun of a finished ablation does not evaluate again."""
    cache = run_dir / 'ablation_top1.json'
    if result.final_eval:
        top1 = result.final_eval['top1']
    elif cache.is_file() and json.loads(cache.read_text()).get('global_step') == result.global_step:
        return json.loads(cache.read_text())['top1']
    else:
        from ..engine.evaluate import evaluate_checkpoint
        log(f'evaluating {run_dir / "last.pth"} (global step {result.global_step})')
        top1 = evaluate_checkpoint(
            str(run_dir / 'last.pth'), config['data'], dataset=config['dataset'], split='val',
            batch_size=config['batch_size'], workers=config['workers'], device=config['device'])['top1']
    cache.write_text(json.dumps({'global_step': result.global_step, 'top1': top1}))
    return top1


def _claim_tables(folder: Path, variants: Sequence[str], force: bool) -> None:
    """The tables of a fresh ablation are outputs like any other; those of one being resumed (a variant folder
    holds last.pth) are its own, rewritten as it goes."""
    if not any((folder / v / 'last.pth').exists() for v in variants):
        claim_all([folder / f'results{suffix}' for suffix in ('.json', '.md', '.png')], force=force)


def run_ablation(
        variants: Sequence[str] = DEFAULT_VARIANTS,
        dataset: str = 'fashion_mnist',
        data: Optional[str] = None,
        recipe: str = 'fashion_mnist',
        epochs: int = DEFAULT_EPOCHS,
        max_steps: Optional[int] = None,
        batch_size: Optional[int] = None,
        seed: int = 0,
        scale: str = 'small',
        img_size: Optional[int] = None,
        name: Optional[str] = None,
        output: str = 'runs',
        device: str = 'auto',
        throughput_batch: int = 64,
        throughput_seconds: float = 3.0,
        overrides: Optional[Dict[str, Any]] = None,
        log: Callable[[str], None] = print,
        force: bool = False,
) -> AblationResult:
    """Train every variant with the same recipe, data, seed and budget; measure them; write the tables.

    Args:
        variants: Names from `ABLATION_VARIANTS`.
        dataset, data: A data set of `DATASET_DEFAULTS` and its folder (Fashion-MNIST defaults to
            data/fashion-mnist); image size, channels, normalisation and class count follow the data set.
        recipe: The training recipe every variant shares (the small-image demo recipe by default).
        epochs, max_steps, batch_size, seed: The shared budget and seed (batch size: the recipe's when None).
        scale: 'small' (the common small-scale builds, for 28-32 px) or 'paper' (the registered builders as they
            are, for 224 px data).
        img_size: Overrides the data set's image size.
        name: Results go to OUTPUT/ablate-NAME (default: the data set's name), each run to its VARIANT folder.
        throughput_batch, throughput_seconds: The timed inference loop.
        overrides: Any other recipe keys (e.g. {'lr': 1e-3}).
        force: Replace the files of an ablation (or variant) folder that is not being resumed.
    """
    chosen = _check_variants(variants)
    if dataset not in DATASET_DEFAULTS and dataset not in STREAMING_DATASETS:
        raise ConfigError(f'unknown dataset {dataset!r}; choose one of '
                          f'{", ".join([*DATASET_DEFAULTS, *STREAMING_DATASETS])}')
    if scale not in ('small', 'paper'):
        raise ConfigError(f"scale must be 'small' or 'paper', got {scale!r}")
    overrides = dict(overrides or {})
    clash = sorted(set(overrides) & set(_SET_BY_ABLATE))
    if clash:
        raise ConfigError(f'the ablation sets {", ".join(clash)} itself for every variant; use --variants, --scale, '
                          f'--name and --output instead')
    if dataset in STREAMING_DATASETS:
        if data is None:
            raise ConfigError(f'--dataset {dataset} needs its folder: pass --data DIR')
        # a converted store follows the data set it came from (image size, channels, normalisation)
        facts = dict(DATASET_DEFAULTS[stored_source(dataset, data) or 'imagefolder'])
    else:
        facts = dict(DATASET_DEFAULTS[dataset])
    data = data or facts['data']
    if data is None and dataset != 'fake':
        raise ConfigError(f'--dataset {dataset} needs its folder: pass --data DIR')
    size = img_size or (224 if scale == 'paper' and dataset == 'imagefolder' else facts['img_size'])
    folder = Path(output) / f'ablate-{name or dataset}'
    _claim_tables(folder, chosen, force)

    shared = dict(
        dataset=dataset, data=data, img_size=size, in_chans=facts['in_chans'], mean=list(facts['mean']),
        std=list(facts['std']), epochs=epochs, max_steps=max_steps, batch_size=batch_size, seed=seed,
        device=device, output=str(folder),
        val_holdout=0)  # the table reports final weights on the validation split: nothing is selected on it
    shared.update(overrides)
    probe = resolve_config(recipe, dict(shared, model=chosen[0]))
    # fail before any training when the data is not there (the message names the files and where to put them)
    train_set = build_dataset(dataset, data, 'train', in_chans=probe['in_chans'], fake_image_size=size, seed=seed,
                              fake_num_samples=probe['fake_num_samples'])
    build_dataset(dataset, data, 'val', in_chans=probe['in_chans'], fake_image_size=size, seed=seed,
                  fake_num_samples=probe['fake_num_samples'])
    num_classes = overrides.get('num_classes', facts['num_classes'])  # None: the data set's count

    measure_device = pick_device(device)
    setup = dict(
        dataset=dataset, data=str(data) if data else None, recipe=recipe, img_size=size, in_chans=probe['in_chans'],
        epochs=probe['epochs'], max_steps=probe['max_steps'], batch_size=probe['batch_size'], seed=seed,
        scale=scale, device=str(measure_device), torch_threads=torch.get_num_threads(),
        throughput_batch=throughput_batch, macs_convention=MACS_CONVENTION,
        paper='Yuan et al., ICCV 2021, Tables 6 and 7: ImageNet-1k top-1 at 224 px, trained from scratch')
    results: List[VariantResult] = []
    interrupted = False

    from ..engine.train import TrainingDiverged, train
    for variant in chosen:
        kwargs = _model_kwargs(variant, scale)
        config = resolve_config(recipe, dict(shared, model=variant, model_kwargs=kwargs, run_name=variant))
        config['num_classes'] = num_classes  # set after resolving: the recipe's 10 must give way to None too
        run_dir = folder / variant
        log(f'--- {variant}: {ABLATION_VARIANTS[variant].idea} -> {run_dir}')
        status, top1, global_step = 'finished', None, 0
        try:
            result = train(config, resume='auto', force=force)
        except TrainingDiverged as e:
            log(f'{variant} diverged: {e}')
            status = 'diverged'
        else:
            if result.status == 'interrupted':
                interrupted = True
                break
            status, global_step = result.status, result.global_step
            top1 = _top1_of_run(config, run_dir, result, log)

        model = timm.create_model(variant, num_classes=num_classes or train_set.num_classes, img_size=size,
                                  in_chans=config['in_chans'], **kwargs).to(measure_device)
        input_size = (config['in_chans'], size, size)
        total, trainable = count_parameters(model)
        paper: Optional[PaperResult] = DESIGN_STUDY.get(variant)
        results.append(VariantResult(
            variant=variant, idea=ABLATION_VARIANTS[variant].idea, params_total=total, params_trainable=trainable,
            macs=count_macs(model, input_size),
            images_per_s=images_per_second(model, input_size, throughput_batch, throughput_seconds, measure_device),
            top1=top1, status=status, global_step=global_step, run_dir=str(run_dir), model_kwargs=kwargs,
            paper=asdict(paper) if paper else None))
        r = results[-1]
        log(f'{variant}: {r.params_total / 1e6:.3f}M params, {r.macs / 1e6:.1f}M MACs, {r.images_per_s:.0f} images/s, '
            f'top-1 {"-" if top1 is None else f"{top1:.2f}%"}')

    files = write_tables(folder, results, setup) if results else []
    return AblationResult(folder=folder, results=results, setup=setup, files=files, interrupted=interrupted)


# --- the tables ------------------------------------------------------------------------------------------------------

def _fmt(value: Optional[float], digits: int) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def format_markdown(results: Sequence[VariantResult], setup: Dict[str, Any]) -> str:
    steps = f"max {setup['max_steps']} steps" if setup['max_steps'] else f"{setup['epochs']} epoch(s)"
    lines = [
        f"# T2T-ViT design study on {setup['dataset']}",
        '',
        f"Same recipe (`{setup['recipe']}`), seed {setup['seed']} and budget ({steps}, batch {setup['batch_size']}) "
        f"for every variant; {setup['img_size']} px, {setup['in_chans']} channel(s); {setup['scale']}-scale builds. "
        f"Top-1 is on the validation (test) split after the budget. Params count the frozen tensors too, as the "
        f"paper does. images/s: inference, batch {setup['throughput_batch']}, on {setup['device']} with "
        f"{setup['torch_threads']} thread(s). {setup['macs_convention']}",
        '',
        f"Paper columns: {setup['paper']}; a different data set and scale, for reference only.",
        '',
        '| variant | idea | params (M) | MACs (M) | images/s | top-1 (%) | paper model | paper top-1 (%) '
        '| paper params (M) | paper MACs (G) |',
        '|---|---|---:|---:|---:|---:|---|---:|---:|---:|',
    ]
    for r in results:
        p = r.paper or {}
        top1 = _fmt(r.top1, 2) if r.status != 'diverged' else 'diverged'
        lines.append(
            f"| `{r.variant}` | {r.idea} | {r.params_total / 1e6:.3f} | {r.macs / 1e6:.1f} | {r.images_per_s:.0f} "
            f"| {top1} | {p.get('model', '-')} | {_fmt(p.get('top1'), 1)} | {_fmt(p.get('params_m'), 1)} "
            f"| {_fmt(p.get('macs_g'), 1)} |")
    return '\n'.join(lines) + '\n'


def plot_results(results: Sequence[VariantResult], setup: Dict[str, Any], out_png: Path) -> Path:
    """Four bar charts side by side, one bar per variant: our top-1, MACs, images/s, and the paper's top-1."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = [r.variant for r in results]
    panels = [
        (f"top-1 on {setup['dataset']} (%)", [r.top1 for r in results], 'tab:blue'),
        ('MACs per image (M)', [r.macs / 1e6 for r in results], 'tab:orange'),
        (f"images/s ({setup['device']})", [r.images_per_s for r in results], 'tab:green'),
        ('paper: ImageNet top-1 (%)', [(r.paper or {}).get('top1') for r in results], 'tab:gray'),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 1.0 + 0.45 * len(names)), sharey=True)
    positions = list(range(len(names)))
    for ax, (title, values, color) in zip(axes, panels):
        shown = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.barh(positions, shown, color=color)
        for bar, value in zip(bars, values):
            label = '-' if value is None else (f'{value:.1f}' if value < 1000 else f'{value:.0f}')
            ax.annotate(label, (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords='offset points', va='center', fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.25)
    axes[0].set_yticks(positions, names)
    axes[0].invert_yaxis()
    fig.suptitle(f"T2T-ViT design study: {setup['dataset']}, {setup['img_size']} px, {setup['scale']} scale")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_tables(folder: Path, results: Sequence[VariantResult], setup: Dict[str, Any]) -> List[Path]:
    """results.json (everything), results.md (the table) and results.png (the bar charts) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = folder / 'results.json', folder / 'results.md', folder / 'results.png'
    json_path.write_text(json.dumps({'setup': setup, 'results': [asdict(r) for r in results]}, indent=1))
    md_path.write_text(format_markdown(results, setup))
    plot_results(results, setup, png_path)
    return [json_path, md_path, png_path]

