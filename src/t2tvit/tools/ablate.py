"""`t2tvit ablate`: the paper's design study (Tables 6 and 7) rerun on one small data set, one recipe, one budget,
with several seeds, training-set sizes and timm baselines.

Every run (variant, seed, training-set size) is trained by the ordinary training engine into
`OUTPUT/ablate-NAME/VARIANT/seedS-SIZE` for the same number of optimizer steps, and its final weights are scored on
the validation (test) split; nothing is selected on it. Rerunning the same command skips finished runs and resumes
the one it stopped in. Each variant is measured once: parameters, MACs of one image, inference images/s.
`t2tvit.tools.ablate_report` turns the runs into `results.json` / `results.md` / PNG figures: per-variant means
with t-intervals, paired differences against the baseline, and a verdict on each claim of the paper.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..data import build_dataset
from ..data.datasets import STREAMING_DATASETS
from ..data.streaming import stored_source
from ..engine.config import ConfigError, resolve_config
from ..engine.distributed import pick_device
from ..engine.checkpointing import atomic_write
from ..engine.preflight import check_memory
from ..models import count_parameters
from ..outputs import claim_all
from . import complexity
from .ablate_build import build_variant, check_variant_input, check_variants, idea_of, variant_kwargs
from .ablate_variants import (  # noqa: F401  (part of this module's interface)
    ABLATION_VARIANTS, BASELINE, DATASET_DEFAULTS, DEFAULT_SEEDS, DEFAULT_STEPS, DEFAULT_VARIANTS, SMALL_BASE,
    WARMUP_FRACTION, AblationVariant)

__all__ = ['AblationVariant', 'ABLATION_VARIANTS', 'DEFAULT_VARIANTS', 'DATASET_DEFAULTS', 'RunRecord',
           'AblationResult', 'run_ablation', 'count_macs', 'images_per_second', 'parse_sizes']

_SET_BY_ABLATE = ('model', 'model_kwargs', 'run_name', 'output', 'pretrained', 'seed', 'max_steps', 'epochs',
                  'val_holdout', 'eval_interval')

MACS_CONVENTION = ('MACs = FLOPs / 2 from torch.utils.flop_counter over one forward pass of one image: matrix '
                   'products and convolutions, attention included (t2tvit.tools.complexity, convention "all"); '
                   'element-wise operations (norms, activations, the Ghost cheap operations, SE gating) are not '
                   'counted. This reproduces the paper\'s counts: T2T-ViT-14 at 224 px gives 4.78 G here, 4.8 G in '
                   'the paper; T2T-ViT_t-14 6.09 G and 6.1 G.')


@dataclass
class RunRecord:
    """One training run and the top-1 of its final weights on the validation (test) split."""
    variant: str
    seed: int
    train_images: Union[int, str]  # a seeded subset of the training split, or 'all' of it
    top1: Optional[float]
    status: str  # 'budget' (max_steps reached), 'finished', 'diverged'
    global_step: int
    run_dir: str
    seconds: Optional[float] = None


@dataclass
class AblationResult:
    folder: Path
    runs: List[RunRecord]
    record: Dict[str, Any]  # what results.json holds
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



def parse_sizes(sizes: Sequence[Union[int, str]], available: int, batch_size: int) -> List[Union[int, str]]:
    """Training-set sizes, smallest first, 'all' (the whole training split) last; each checked against the data."""
    chosen: List[Union[int, str]] = []
    for size in sizes:
        text = str(size).strip().lower()
        if text == 'all':
            value: Union[int, str] = 'all'
        elif text.isdigit() and int(text) > 0:
            value = int(text)
        else:
            raise ConfigError(f'--train-images {size!r}: give whole numbers of training images or all, e.g. '
                              f'2000,10000,all')
        if isinstance(value, int) and value > available:
            raise ConfigError(f'--train-images {value} is more than the {available} training images of the data set; '
                              f'give sizes up to {available}, or all')
        if isinstance(value, int) and value < batch_size:
            raise ConfigError(f'--train-images {value} is fewer than one batch ({batch_size} images); give at least '
                              f'{batch_size}, or lower --batch-size')
        if value not in chosen:
            chosen.append(value)
    if not chosen:
        raise ConfigError('--train-images: give at least one size, e.g. all')
    return sorted(chosen, key=lambda v: available + 1 if v == 'all' else v)


@dataclass
class _Study:
    """What every run of one study shares."""
    folder: Path
    recipe: str
    shared: Dict[str, Any]  # recipe keys of every run
    train_size: int  # images in the whole training split
    num_classes: int
    max_steps: int
    kwargs: Dict[str, Dict[str, Any]]  # builder arguments per variant
    device: torch.device
    log: Callable[[str], None]
    force: bool = False  # replace the files of runs that are not being resumed


def _run_config(study: _Study, variant: str, seed: int, size: Union[int, str]) -> Dict[str, Any]:
    """The recipe of one run: a seeded subset is the training split minus `val_holdout` images held out by seed
    (never read: evaluation during training is off), so the test split stays whole and untouched until scoring."""
    images = study.train_size if size == 'all' else int(size)
    steps_per_epoch = max(1, images // study.shared['batch_size'])
    overrides = dict(
        study.shared, model=variant, model_kwargs=study.kwargs[variant], seed=seed, max_steps=study.max_steps,
        output=str(study.folder / variant), run_name=f'seed{seed}-{size}',
        val_holdout=study.train_size - images,
        epochs=study.max_steps // steps_per_epoch + 1,  # the step budget, not the epoch count, ends every run
        eval_interval=10 ** 9)
    overrides.setdefault('sched', 'cosine')
    overrides.setdefault('sched_steps', study.max_steps)
    overrides.setdefault('warmup_epochs', WARMUP_FRACTION * study.max_steps / steps_per_epoch)
    config = resolve_config(study.recipe, overrides)
    config['num_classes'] = study.num_classes
    return config


def _score(config: Dict[str, Any], run_dir: Path, num_classes: int, device: torch.device) -> float:
    """Top-1 of the run's final weights (last.pth) on the data set's validation (test) split."""
    from torch.utils.data import DataLoader

    from ..engine.build import eval_transform_for, fake_split_size
    from ..engine.evaluate import evaluate
    from ..models import read_checkpoint
    model = build_variant(config['model'], config['model_kwargs'], config['img_size'], config['in_chans'],
                          num_classes)
    model.load_state_dict(read_checkpoint(run_dir / 'last.pth')['state_dict'])
    test_set = build_dataset(
        config['dataset'], config['data'], 'val', transform=eval_transform_for(config, model),
        in_chans=config['in_chans'], fake_num_samples=fake_split_size(config['fake_num_samples'], 'val'),
        fake_num_classes=num_classes, fake_image_size=config['img_size'], seed=config['seed'])
    loader = DataLoader(test_set, batch_size=256, shuffle=False, num_workers=0)
    return evaluate(model.to(device), loader, device, num_classes)['top1']


def _train_run(config: Dict[str, Any], force: bool = False):
    """The training engine's `train` (a seam for tests that interrupt a study)."""
    from ..engine.train import train
    return train(config, resume='auto', force=force)


def _run_one(study: _Study, variant: str, seed: int, size: Union[int, str]) -> Optional[RunRecord]:
    """Train (or resume, or skip when done) one run and score it; None when it was interrupted."""
    from ..errors import TrainingDiverged
    config = _run_config(study, variant, seed, size)
    run_dir = Path(config['output']) / config['run_name']
    done = run_dir / 'ablation_run.json'
    if done.is_file():
        record = RunRecord(**json.loads(done.read_text()))
        if record.global_step == study.max_steps or record.status == 'diverged':
            return record
    study.log(f'--- {variant}, seed {seed}, {size} training images -> {run_dir}')
    start = time.time()
    try:
        result = _train_run(config, study.force)
    except TrainingDiverged as e:
        study.log(f'{variant} diverged: {e}')
        record = RunRecord(variant, seed, size, None, 'diverged', 0, str(run_dir))
    else:
        if result.status == 'interrupted':
            return None
        top1 = _score(config, run_dir, study.num_classes, study.device)
        record = RunRecord(variant, seed, size, top1, result.status, result.global_step, str(run_dir),
                           round(time.time() - start, 1))
        study.log(f'{variant}, seed {seed}, {size}: top-1 {top1:.2f}% after {result.global_step} steps')
    done.parent.mkdir(parents=True, exist_ok=True)
    _write_json(done, asdict(record))
    return record


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(value).encode()), 'study record')


def _measure(study: _Study, variant: str, throughput_batch: int, throughput_seconds: float) -> Dict[str, Any]:
    """Params, MACs and inference images/s of one variant; kept in VARIANT/measure.json so a rerun reuses them."""
    shared = study.shared
    key = dict(kwargs=study.kwargs[variant], img_size=shared['img_size'], in_chans=shared['in_chans'],
               num_classes=study.num_classes, throughput_batch=throughput_batch, device=str(study.device))
    cache = study.folder / variant / 'measure.json'
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get('key') == key:
            return cached['measured']
    model = build_variant(variant, study.kwargs[variant], shared['img_size'], shared['in_chans'],
                          study.num_classes).to(study.device)
    input_size = (shared['in_chans'], shared['img_size'], shared['img_size'])
    total, trainable = count_parameters(model)
    measured = dict(params_total=total, params_trainable=trainable, macs=count_macs(model, input_size),
                    images_per_s=images_per_second(model, input_size, throughput_batch, throughput_seconds,
                                                   study.device))
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_json(cache, {'key': key, 'measured': measured})
    return measured


def _data_facts(dataset: str, data: Optional[str], scale: str, img_size: Optional[int]) -> Tuple[Dict[str, Any], Any]:
    """(image size, channels, normalisation, classes, folder) of the data set, and its folder."""
    if dataset not in DATASET_DEFAULTS and dataset not in STREAMING_DATASETS:
        raise ConfigError(f'unknown dataset {dataset!r}; choose one of '
                          f'{", ".join([*DATASET_DEFAULTS, *STREAMING_DATASETS])}')
    if scale not in ('small', 'paper'):
        raise ConfigError(f"scale must be 'small' or 'paper', got {scale!r}")
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
    facts['img_size'] = img_size or (224 if scale == 'paper' and dataset == 'imagefolder' else facts['img_size'])
    return facts, data


def _prepare(variants, dataset, data, recipe, max_steps, batch_size, seeds, train_images, model_kwargs, scale,
             img_size, name, output, device, overrides, log) -> Tuple[_Study, List[str], List[Any]]:
    """Check every input and the data before anything trains; the study's shared settings."""
    chosen = check_variants(variants, model_kwargs)
    if not seeds:
        raise ConfigError('--seeds: give at least one seed, e.g. 0,1,2')
    overrides = dict(overrides or {})
    clash = sorted(set(overrides) & set(_SET_BY_ABLATE))
    if clash:
        raise ConfigError(f'the ablation sets {", ".join(clash)} itself for every run; use --variants, --seeds, '
                          f'--max-steps, --train-images, --model-kwargs, --name and --output instead')
    facts, data = _data_facts(dataset, data, scale, img_size)
    shared = dict(dataset=dataset, data=data, img_size=facts['img_size'], in_chans=facts['in_chans'],
                  mean=list(facts['mean']), std=list(facts['std']), batch_size=batch_size, device=device)
    shared.update(overrides)
    probe = resolve_config(recipe, dict(shared, model=chosen[0]))
    shared['batch_size'] = probe['batch_size']
    # an image size or batch too large for memory is refused before any model or data set is built
    check_memory(probe['img_size'], probe['in_chans'], probe['batch_size'], pick_device(device).type)
    # fail before any training when the data is not there (the message names the files and where to put them)
    train_set = build_dataset(dataset, data, 'train', in_chans=probe['in_chans'], fake_image_size=probe['img_size'],
                              seed=0, fake_num_samples=probe['fake_num_samples'])
    build_dataset(dataset, data, 'val', in_chans=probe['in_chans'], fake_image_size=probe['img_size'], seed=0,
                  fake_num_samples=probe['fake_num_samples'])
    sizes = parse_sizes(train_images, len(train_set), probe['batch_size'])
    num_classes = overrides.get('num_classes') or facts['num_classes'] or train_set.num_classes
    kwargs = {v: variant_kwargs(v, scale, model_kwargs) for v in chosen}
    for variant in chosen:
        check_variant_input(variant, kwargs[variant], probe['img_size'], probe['in_chans'], num_classes)
    study = _Study(folder=Path(output) / f'ablate-{name or dataset}', recipe=recipe, shared=shared,
                   train_size=len(train_set), num_classes=num_classes, max_steps=max_steps, kwargs=kwargs,
                   device=pick_device(device), log=log)
    return study, chosen, sizes


def _claim_tables(folder: Path, force: bool) -> None:
    """The tables of a fresh study are outputs like any other; those of one being resumed (a run folder exists)
    are its own, rewritten as it goes."""
    if not any(folder.glob('*/seed*/last.pth')) and not any(folder.glob('*/seed*/ablation_run.json')):
        claim_all([folder / name for name in ('results.json', 'results.md', 'results.png', 'results_macs.png',
                                              'results_sizes.png')], force=force)


def plan_runs(variants: Sequence[str], seeds: Sequence[int], sizes: Sequence[Union[int, str]],
              sweep_variants: Optional[Sequence[str]]) -> List[Tuple[str, int, Union[int, str]]]:
    """Every (variant, seed, size), seed by seed: all variants at the largest size, then the sweep variants at the
    smaller sizes. A study cut short then has whole seeds of every comparison."""
    sweep = list(variants) if sweep_variants is None else [v for v in variants if v in sweep_variants]
    runs = []
    for seed in seeds:
        runs += [(v, seed, sizes[-1]) for v in variants]
        runs += [(v, seed, size) for size in reversed(sizes[:-1]) for v in sweep]
    return runs


def run_ablation(
        variants: Sequence[str] = DEFAULT_VARIANTS,
        dataset: str = 'fashion_mnist',
        data: Optional[str] = None,
        recipe: str = 'fashion_mnist',
        max_steps: int = DEFAULT_STEPS,
        batch_size: Optional[int] = None,
        seeds: Sequence[int] = DEFAULT_SEEDS,
        train_images: Sequence[Union[int, str]] = ('all',),
        sweep_variants: Optional[Sequence[str]] = None,
        model_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
        scale: str = 'small',
        img_size: Optional[int] = None,
        name: Optional[str] = None,
        output: str = 'runs',
        device: str = 'auto',
        throughput_batch: int = 64,
        throughput_seconds: float = 3.0,
        overrides: Optional[Dict[str, Any]] = None,
        command: Optional[str] = None,
        log: Callable[[str], None] = print,
        force: bool = False,
) -> AblationResult:
    """Train every (variant, seed, training-set size) for `max_steps` optimizer steps; score, measure, report.

    Args:
        variants: Names from `ABLATION_VARIANTS` (their small-scale builds) or any timm model name.
        dataset, data: A data set of `DATASET_DEFAULTS` and its folder (Fashion-MNIST defaults to
            data/fashion-mnist); image size, channels, normalisation and class count follow the data set.
        recipe: The training recipe every run shares; its epochs and schedule give way to the step budget.
        max_steps, batch_size: The budget of every run (batch size: the recipe's when None).
        seeds: One run per seed; two or more give intervals.
        train_images: Training-set sizes (seeded subsets; 'all': the whole split). Every variant trains at the
            largest; `sweep_variants` (default: every variant) also at the others. The test split stays whole.
        model_kwargs: Builder arguments per variant, e.g. {'deit_tiny_patch16_224': {'patch_size': 4}}.
        scale: 'small' (the common small-scale builds, for 28-32 px) or 'paper' (the registered builders).
        img_size: Overrides the data set's image size.
        name: Results go to OUTPUT/ablate-NAME (default: the data set's name), each run to VARIANT/seedS-SIZE.
        throughput_batch, throughput_seconds: The timed inference loop.
        overrides: Any other recipe keys (e.g. {'lr': 1e-3}).
        command: The command line, recorded in results.json.
        force: Replace the files of a study (or of its runs) that is not being resumed.
    """
    from .ablate_report import build_record, write_tables
    seeds = [int(s) for s in dict.fromkeys(seeds)]
    stray = [v for v in sweep_variants or [] if v not in variants]
    if stray:
        raise ConfigError(f'--sweep-variants names {", ".join(stray)}, which is not among --variants; give a subset '
                          f'of --variants')
    study, chosen, sizes = _prepare(variants, dataset, data, recipe, max_steps, batch_size, seeds, train_images,
                                    model_kwargs, scale, img_size, name, output, device, overrides, log)
    study.force = force
    _claim_tables(study.folder, force)
    setup = _setup(study, seeds, sizes, sweep_variants, scale, throughput_batch, command)
    runs: List[RunRecord] = []
    measured: Dict[str, Dict[str, Any]] = {}
    interrupted = False
    for variant, seed, size in plan_runs(chosen, seeds, sizes, sweep_variants):
        record = _run_one(study, variant, seed, size)
        if record is None:
            interrupted = True
            break
        runs.append(record)
        if variant not in measured:
            measured[variant] = _measure(study, variant, throughput_batch, throughput_seconds)
        # the tables after every run (the figures at the end): a study cut short still reports what it has
        write_tables(study.folder, build_record(setup, runs, measured, chosen), figures=False)
    record = build_record(setup, runs, measured, chosen)
    files = write_tables(study.folder, record) if runs else []
    return AblationResult(folder=study.folder, runs=runs, record=record, files=files, interrupted=interrupted)


def _setup(study: _Study, seeds: List[int], sizes: List[Any], sweep_variants: Optional[Sequence[str]], scale: str,
           throughput_batch: int, command: Optional[str]) -> Dict[str, Any]:
    import datetime

    from .ablate_report import host_name
    shared = study.shared
    return dict(
        dataset=shared['dataset'], data=str(shared['data']) if shared['data'] else None, recipe=study.recipe,
        img_size=shared['img_size'], in_chans=shared['in_chans'], num_classes=study.num_classes,
        max_steps=study.max_steps, batch_size=shared['batch_size'], seeds=seeds, train_images=sizes,
        train_split_images=study.train_size, sweep_variants=list(sweep_variants) if sweep_variants else None,
        baseline=BASELINE, schedule=f"linear warm-up over {WARMUP_FRACTION:.0%} of the steps, then cosine decay "
        f"to min_lr at the last step" if 'sched' not in shared else f"{shared['sched']} (--set)",
        overrides={k: v for k, v in shared.items() if k not in ('dataset', 'data', 'img_size', 'in_chans', 'mean',
                                                                 'std', 'batch_size', 'device')},
        model_kwargs=study.kwargs, scale=scale, device=str(study.device), torch_threads=torch.get_num_threads(),
        throughput_batch=throughput_batch, macs_convention=MACS_CONVENTION, host=host_name(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d'), command=command,
        paper='Yuan et al., ICCV 2021, Tables 6 and 7: ImageNet-1k top-1 at 224 px, trained from scratch')
