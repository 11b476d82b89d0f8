"""`t2tvit` command line: each subcommand is a table of options and one function that calls the library.

Every option is an `Option` entry (t2tvit.options): its flag, type, range, default and help come from the entry,
and its value is checked against it while the command line is read, before anything is imported beyond the
standard library and PyYAML. So `--help` and a bad value answer at once; torch and timm load when a command runs.
Adding an option is one entry in its command's table (train/finetune take every recipe key of RECIPE_OPTIONS).

Errors are told apart by class alone (t2tvit.errors): an `InputError` (a bad value, file or checkpoint) is one line
`error: ...` naming the problem and the fix, exit status 2, as is running out of memory (with the fix); a diverged
run (`TrainingDiverged`) exits 3, a process whose torchrun peer stopped (`PeerLost`) 4; any other exception is a
bug: one line saying where its traceback was written (`--debug` prints it instead), exit 1. Library errors whose
meaning is known are wrapped where they are raised.
"""
from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import InputError, PeerLost, TrainingDiverged
from ..options import (DATASET_NAMES, MESSAGE_MARK, RECIPE_OPTIONS, Option, OptionError, check_agreement,
                       check_weights_source)
from ..outputs import command_outputs, unique_stems
from ..tools.ablate_variants import (ABLATION_VARIANTS, DATASET_DEFAULTS, DEFAULT_SEEDS, DEFAULT_STEPS, DEFAULT_VARIANTS,
                                     SIZE_SWEEP_VARIANTS, NamedMappingOption)

EXIT_ERROR = 2  # bad input: option, config, data, checkpoint
EXIT_UNEXPECTED = 1
EXIT_DIVERGED = 3
EXIT_PEER_LOST = 4  # a process of the torchrun group stopped: torchrun restarts the group
EXIT_INTERRUPTED = 128 + signal.SIGINT


def _error(message: str, code: int = EXIT_ERROR) -> int:
    print(f'error: {message}', file=sys.stderr)
    return code


class UsageError(InputError):
    """The command line does not parse: an unknown flag, a missing argument or a value its option refuses."""


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing the usage and exiting, so `main` reports it in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if MESSAGE_MARK in message:  # 'argument --lr: --lr 0: give ...' -> '--lr 0: give ...'
            message = message.split(MESSAGE_MARK, 1)[1]
        raise UsageError(f'{message} (`{self.prog} --help` lists the options)')


# --- option tables ------------------------------------------------------------------------------------------------

def _O(name: str, kind: str = 'str', default: Any = None, help: str = '', **more: Any) -> Option:  # noqa: N802
    return Option(name, kind, default, help, **more)


CHECKPOINT = _O('checkpoint', 'file', None, 't2tvit or official checkpoint, .pth/.pth.tar/.safetensors')
MODEL = _O('model', 'str', None, 'model name (default: what the checkpoint says; `t2tvit info` lists them)')
MODEL_KWARGS = _O('model_kwargs', 'mapping', None, 'builder arguments, e.g. "{embed_dim: 64, depth: 2}" '
                  '(default: from the checkpoint)')
IMG_SIZE = _O('img_size', 'int', None, 'input size, pixels (default: from the checkpoint)', low=1)
IN_CHANS = _O('in_chans', 'int', None, 'input channels (default: from the checkpoint)', low=1)
DEVICE = _O('device', 'choice', 'auto', 'where to run', choices=('auto', 'cpu', 'cuda'))
FORCE = _O('force', 'flag', help='replace outputs that exist already (never an input)')
PRETRAINED = _O('pretrained', 'flag', help="use the released weights of --model, a pretrained tag such as "
                "t2t_vit_14.in1k (downloaded once into timm's cache; timm.list_pretrained('t2t*') lists them)")
MODEL = replace(MODEL, help='model name or pretrained tag (default: what the checkpoint says; `t2tvit info` lists '
                'them)')
MODEL_FLAGS = (MODEL, MODEL_KWARGS, IMG_SIZE, IN_CHANS, PRETRAINED)

INFO = (
    _O('fixtures', 'dir', None, 'folder with tiny_configs.json and official *.pth.tar/_io.pt files to check against',
       metavar='DIR'),
    _O('tolerance', 'float', 1e-5, 'largest allowed abs difference', low=0, open_low=True),
    _O('no_tags', 'flag', help='list only the base names, not the .in1k_384 tags'),
)

TRAIN = (
    _O('config', 'str', 'fashion_mnist', 'recipe name or YAML file', flags=('-c',), metavar='RECIPE'),
    _O('resume', 'file', None, 'resume from this checkpoint (default: RUN_DIR/last.pth when it exists)'),
    _O('no_resume', 'flag', help='start afresh; refuse an existing run folder'),
    replace(FORCE, help="replace the run folder's files instead of resuming it (with --no-resume), or those of a "
            "run that saved no last.pth"),
)
FINETUNE = (
    _O('config', 'str', None, "recipe name or YAML file over the finetune recipe (default: none)", flags=('-c',),
       metavar='RECIPE'),
    _O('checkpoint', 'file', None, 'checkpoint to start from; its architecture is used unless --model or the '
       'recipe names one (or --model TAG --pretrained: its released weights)'),
    PRETRAINED, TRAIN[1], TRAIN[2], TRAIN[3],
)

EVAL = (
    _O('checkpoint', 'file', None, 't2tvit or official checkpoint (or --model TAG --pretrained)'),
    _O('data', 'path', None, 'data set folder (default: from the checkpoint; hfds: also a hub name)', metavar='DIR'),
    MODEL, MODEL_KWARGS, PRETRAINED,
    _O('dataset', 'choice', None, 'data set kind (default: from the checkpoint, else imagefolder)',
       choices=DATASET_NAMES),
    _O('split', 'choice', 'val', 'which split', choices=('val', 'test', 'train')),
    IMG_SIZE, IN_CHANS,
    _O('crop_pct', 'float', None, 'centre crop fraction (default: from the checkpoint)', low=0, high=1,
       open_low=True),
    replace(RECIPE_OPTIONS['interpolation'], default=None, yaml=False,
            help='resize interpolation (default: from the checkpoint)'),
    _O('batch_size', 'int', 64, 'images per batch', low=1),
    _O('workers', 'int', min(4, os.cpu_count() or 1), 'data loading processes', low=0, high=256),
    _O('amp', 'choice', 'none', 'reduced precision', choices=('none', 'bf16', 'fp16')),
    _O('agreement', 'flag', help='with --amp: also run each batch in fp32 and report how often the top-1 classes '
       'agree'),
    DEVICE,
    _O('on_bad_image', 'choice', 'fail', 'an unreadable image: fail (naming it) or skip (and count it)',
       choices=('fail', 'skip')),
    _O('output', 'path', None, 'folder for eval.json and confusion_matrix.png (default: beside the checkpoint, '
       'CHECKPOINT_DIR/eval-CHECKPOINT_NAME-SPLIT; with --pretrained: runs/eval/TAG-SPLIT)', metavar='DIR'),
    FORCE,
)

PREDICT = (
    _O('images', 'path', help='image files and folders (searched recursively)', positional='+',
       metavar='IMAGE_OR_DIR'),
    _O('checkpoint', 'file', None, CHECKPOINT.help + ' (or --model TAG --pretrained)'),
    *MODEL_FLAGS,
    _O('topk', 'int', 5, 'how many classes to list per image', low=1),
    _O('labels', 'file', None, 'class names, one per line in index order (default: from the checkpoint, the data '
       'set, or ImageNet-1k for 1000-class models)'),
    _O('json', 'flag', help='print one JSON document instead of text'),
    _O('batch_size', 'int', 32, 'images per batch', low=1),
    DEVICE,
)

EXPORT = (
    _O('format', 'choice', None, "what to write; hf: a Hugging Face hub model folder (config.json, "
       "model.safetensors, README.md) that timm.create_model('local-dir:DIR', pretrained=True) loads; onnx-int8: "
       "MODEL.int8.onnx, statically quantized, calibrated on --dataset/--data training images",
       choices=('onnx', 'torchscript', 'exported-program', 'safetensors', 'hf', 'onnx-int8'), required=True),
    _O('checkpoint', 'file', None, CHECKPOINT.help + ' (default: random weights, with a warning)'),
    *MODEL_FLAGS,
    _O('output', 'path', None, 'file or existing folder (default: MODEL.onnx / .pt / .pt2 / .safetensors here)',
       flags=('-o',), metavar='FILE'),
    _O('static_hw', 'flag', help='ONNX: fix height/width at the model size (default: any size, batch always '
       'dynamic)'),
    _O('onnx_exporter', 'choice', 'dynamo', 'dynamo (dynamic height/width) or the legacy TorchScript-based one '
       '(fixed height/width, faster to export)', choices=('dynamo', 'legacy')),
    _O('opset', 'int', 18, 'ONNX opset', low=7, high=30),
    _O('tolerance', 'float', 1e-4, 'largest allowed |exported - eager| in the check', low=0, open_low=True),
    _O('dataset', 'choice', None, 'onnx-int8: data set kind to calibrate on (training split) and measure on '
       '(evaluation split)', choices=DATASET_NAMES),
    _O('data', 'path', None, 'onnx-int8: the data set folder (none for --dataset fake)', metavar='DIR'),
    _O('calibration_images', 'int', 256, 'onnx-int8: training images that set the int8 ranges', low=1,
       high=100000, metavar='N'),
    _O('eval_images', 'int', None, 'onnx-int8: evaluation images for the fp32-vs-int8 top-1 (default: all)',
       low=1, metavar='N'),
    _O('int8_runtime', 'choice', 'onnxruntime', 'onnx-int8: the CPU runtime the file is made for and measured in: '
       'onnxruntime (uint8 activations) or openvino (symmetric int8 activations, which its VNNI/AMX kernels run '
       'fast)', choices=('onnxruntime', 'openvino')),
    FORCE,
)

VISUALIZE = (
    _O('images', 'file', help='image files (default: scikit-image\'s astronaut, chelsea and coffee photos)',
       positional='*', metavar='IMAGE'),
    _O('checkpoint', 'file', None, CHECKPOINT.help + ' (default: random weights, with a warning)'),
    *MODEL_FLAGS,
    _O('output', 'path', 'runs/visualize', 'folder for the PNG files', flags=('-o',), metavar='DIR'),
    _O('blocks', 'ints', None, 'blocks to show, counted from 0 (default: first, middle, last)', low=0,
       metavar='I,J,...'),
    _O('channels', 'int', 16, 'channels per feature map', low=1, high=4096),
    _O('compare', 'str', None, "NAME[=CHECKPOINT],...: instead, the feature maps of several models side by side at "
       "comparable depths (timm names, pretrained tags such as resnet50.a1_in1k, checkpoints or run folders), with "
       "the share of invalid (zero or near-constant) channels of every layer in IMAGE_compare.json",
       metavar='NAME[=CKPT],...'),
    FORCE,
)

ABLATE = (
    _O('variants', 'names', list(DEFAULT_VARIANTS), 'comma-separated variant names (listed below) or any timm model '
       'name (built with the data set\'s image size, channels and classes)', metavar='A,B,...'),
    _O('dataset', 'choice', 'fashion_mnist', 'data set; image size, channels, normalisation and classes follow it '
       '(wds, hfds: those of the data set convert-data wrote them from)', choices=(*DATASET_DEFAULTS, 'wds', 'hfds')),
    _O('data', 'path', None, 'data set folder (default: data/fashion-mnist for fashion_mnist; needed for the others)',
       metavar='DIR'),
    _O('recipe', 'str', 'fashion_mnist', 'training recipe every variant shares', metavar='RECIPE'),
    _O('max_steps', 'int', DEFAULT_STEPS, 'optimizer steps of every run: the same budget for every variant, seed and '
       'training-set size', low=1),
    _O('batch_size', 'int', None, "global batch size (default: the recipe's: 64 for fashion_mnist)", low=1),
    _O('seeds', 'ints', None, 'seeds, one run of every variant each; two or more give intervals (default: '
       + ','.join(map(str, DEFAULT_SEEDS)) + ')', low=0, high=2 ** 63 - 1, metavar='S,T,...'),
    _O('seed', 'int', None, 'one seed instead of --seeds (then every verdict is inconclusive)', low=0,
       high=2 ** 63 - 1),
    _O('train_images', 'str', 'all', 'training-set sizes, comma-separated: seeded subsets of the training split, or '
       'all; the test split stays whole', metavar='N,M,...'),
    _O('sweep_variants', 'names', None, 'the variants that train at every --train-images size (default: all; the '
       'tokenizer comparison: ' + ','.join(SIZE_SWEEP_VARIANTS) + '); the others train at the largest only',
       metavar='A,B,...'),
    NamedMappingOption('model_kwargs', 'str', None, 'builder arguments of one variant, repeatable, e.g. '
                       'deit_tiny_patch16_224="{patch_size: 4}"'),
    _O('scale', 'choice', 'small', 'small: every idea at the common small scale (28-32 px); paper: the registered '
       'builders', choices=('small', 'paper')),
    _O('img_size', 'int', None, "image size (default: the data set's)", low=1),
    _O('name', 'str', None, 'results go to OUTPUT/ablate-NAME (default: the data set name)'),
    _O('output', 'path', 'runs', 'folder holding the ablate-NAME folder', metavar='DIR'),
    _O('device', 'choice', 'auto', 'training and measuring device', choices=('auto', 'cpu', 'cuda')),
    _O('throughput_batch', 'int', 64, 'batch size of the images/s loop', low=1),
    _O('throughput_seconds', 'float', 3.0, 'duration of the images/s loop, seconds', low=0, open_low=True,
       high=3600),
    _O('set', 'setting', None, 'any other recipe key, repeatable, e.g. --set lr=1e-3 --set workers=2 '
       '(t2tvit train --help lists the keys)', metavar='KEY=VALUE'),
    replace(FORCE, help="replace files of an ablation or variant folder that is not being resumed"),
)

BENCHMARK = (
    _O('preset', 'choice', 'cpu', 'starting values', choices=('cpu', 'gpu')),
    _O('smoke', 'flag', help='toy sizes (batch 2, 64 px, 2 rounds): checks the code path, e.g. of --preset gpu on a '
       'CPU'),
    _O('complexity_only', 'flag', help='print the parameter and MAC table of every variant at 224 and 384 px, and '
       'stop'),
    _O('models', 'names', None, 'T2T-ViT variants, comma-separated, or none', metavar='LIST'),
    _O('peers', 'names', None, 'timm models to time beside them, or none', metavar='LIST'),
    _O('train_models', 'names', None, "which of the models and peers train runs time (default: the preset's)",
       metavar='LIST'),
    _O('runs', 'str', None, 'MODE:PRECISION[:COMPILE] items: infer|train, fp32|bf16|int8, eager|compiled; e.g. '
       'infer:fp32,infer:bf16,train:fp32; infer:int8 times fp32 and int8 ONNX graphs in ONNX Runtime and OpenVINO, '
       'batch 1 and 16', metavar='LIST'),
    _O('batch_size', 'int', None, 'images per step', low=1),
    _O('img_size', 'int', None, 'image size, pixels', low=3),
    _O('device', 'choice', None, 'cpu or cuda (default: the preset\'s)', choices=('cpu', 'cuda')),
    _O('threads', 'int', None, 'CPU threads (default: one per core)', low=1, high=4096),
    _O('warmup', 'int', None, 'untimed steps per model before timing (the first compiles)', low=1),
    _O('reps', 'int', None, 'timed rounds; each runs every model once', low=1),
    _O('iters', 'int', None, 'steps per model per round', low=1),
    _O('ab', 'str', None, 'also time a copy of each T2T-ViT without these CPU kernels, side by side: '
       'comma-separated names (an unknown one lists them), or all (the plain model)', metavar='KERNELS'),
    _O('agreement_images', 'int', None, 'images for the bf16-vs-fp32 top-1 agreement (0: skip)', low=0,
       metavar='N'),
    _O('checkpoint', 'named_file', None, 'weights for one model (repeatable), e.g. for a meaningful bf16 agreement',
       metavar='NAME=FILE'),
    _O('peak_size', 'int', None, 'side of the square GEMM that measures the peak', low=16, high=65536,
       metavar='N'),
    _O('reference', 'str', None, 'model the others are divided by, round by round', metavar='NAME'),
    _O('no_variants_table', 'flag', help='skip the table of every variant'),
    _O('output', 'path', None, "folder for JSON and PNG (default: benchmarks; 'none': no files)", metavar='DIR'),
    _O('name', 'str', None, 'file name without suffix (default: DEVICE-DATE)', metavar='STEM'),
    _O('no_plot', 'flag', help='no PNG'),
    _O('data_loading', 'flag', help='instead: images/s one data-loader worker reads, decodes and augments (ImageNet '
       'recipe, 224 px) from an image folder, WebDataset shards and a Hugging Face dataset of synthetic JPEGs, and '
       'the workers per device that --models need (their training images/s timed on --device with --batch-size, '
       'or given by --train-rate)'),
    _O('loading_images', 'int', 256, '--data-loading: synthetic JPEGs per format', low=1, high=100000,
       metavar='N'),
    _O('train_rate', 'str', None, '--data-loading: training images/s per model instead of timing them, e.g. '
       't2t_vit_7=3000,t2t_vit_14=1200', metavar='MODEL=IMG/S,...'),
)

CONVERT_DATA = (
    _O('dataset', 'choice', None, 'what --data holds', choices=('imagefolder', 'cifar10', 'cifar100', 'mnist',
       'fashion_mnist', 'fake'), required=True),
    _O('data', 'dir', None, 'the source folder (as train/eval read it)', metavar='SRC'),
    _O('to', 'choice', None, 'wds (tar shards) or hfds (parquet)', choices=('wds', 'hfds'), required=True),
    _O('output', 'path', None, 'folder to create', flags=('-o',), metavar='OUT', required=True),
    _O('shard_size', 'int', 2000, 'samples per tar or parquet file', low=1, high=10 ** 8),
    _O('seed', 'int', 0, 'seed of the shuffled order of training samples', low=0, high=2 ** 63 - 1),
    _O('force', 'flag', help='replace OUT if it exists (once the new one is complete)'),
)


# --- info ---------------------------------------------------------------------------------------------------------

def _cmd_info(args: argparse.Namespace) -> int:
    from ..tools.info import format_fixture_table, format_variant_table, variant_rows, verify_official_fixtures
    if args.fixtures is not None and not (Path(args.fixtures) / 'tiny_configs.json').is_file():
        return _error(f'{args.fixtures} holds no tiny_configs.json; point --fixtures at the official fixtures folder')
    print(format_variant_table(variant_rows(with_tags=not args.no_tags)))
    if args.fixtures is not None:
        rows = verify_official_fixtures(Path(args.fixtures))
        print()
        print(format_fixture_table(rows, tolerance=args.tolerance))
        worst = max(max(r.pre_logits_max_abs_diff, r.logits_max_abs_diff) for r in rows)
        if worst > args.tolerance:
            return _error(f'outputs differ from the official ones by {worst:.2e} > {args.tolerance:.0e}', 1)
    return 0


# --- train / finetune ---------------------------------------------------------------------------------------------

def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Recipe keys given on the command line (their flags default to 'not given'), nulls included."""
    return {k: getattr(args, k) for k in RECIPE_OPTIONS if hasattr(args, k)}


def _run_training(config: Dict[str, Any], resume: Optional[str], force: bool = False) -> int:
    from ..engine.train import train
    result = train(config, resume=resume, force=force)
    print(f'\nrun folder: {result.run_dir}')
    for name in ('last.pth', 'best.pth', 'metrics.jsonl', 'config.yaml', 'curves.png', 'confusion_matrix.png',
                 'eval.json'):
        path = result.run_dir / name
        if path.exists():
            print(f'  {path}')
    if result.final_eval:
        print(f"final eval: top-1 {result.final_eval['top1']:.2f}%, top-5 {result.final_eval['top5']:.2f}% on "
              f"{result.final_eval['samples']} images; best top-1 {result.best_top1:.2f}%; "
              f"{result.seconds / 60:.1f} min")
    if result.status == 'interrupted':
        print('interrupted: run the same command again to resume from last.pth', file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.status == 'budget':
        print(f'stopped at max_steps={config["max_steps"]}: raise --max-steps and rerun the same command to continue')
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..engine.config import resolve_config
    config = resolve_config(args.config, _overrides(args), keep_null=True)
    _device(config['device'])
    return _run_training(config, _resume_arg(args), args.force)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..engine.config import load_recipe, resolve_config
    from ..engine.restore import architecture_of
    overrides = _overrides(args)
    overrides['pretrained'] = _weights_source(args, overrides.get('model'))
    # the checkpoint's own architecture, unless the command line or the recipe names a model
    base = dict(load_recipe('finetune'), **(architecture_of(args.checkpoint) if args.checkpoint else {}))
    config = resolve_config(args.config, overrides, base=base, keep_null=True)
    if config['recipe'] is None:
        config['recipe'] = 'finetune'
    _device(config['device'])
    return _run_training(config, _resume_arg(args), args.force)


def _weights_source(args: argparse.Namespace, model: Optional[str]) -> str:
    """finetune: --checkpoint FILE, or --pretrained with --model TAG (its released weights)."""
    check_weights_source(args.checkpoint, args.pretrained, model, purpose='to start from')
    return model if args.pretrained else args.checkpoint


def _resume_arg(args: argparse.Namespace) -> Optional[str]:
    if args.no_resume:
        if args.resume:
            raise OptionError('--resume and --no-resume contradict each other; give one')
        return None
    return args.resume or 'auto'


# --- eval ---------------------------------------------------------------------------------------------------------

def _cmd_eval(args: argparse.Namespace) -> int:
    from ..engine.evaluate import evaluate_checkpoint
    from ..engine.preflight import check_outputs
    check_agreement(args.agreement, args.amp)
    check_weights_source(args.checkpoint, args.pretrained, args.model)
    _device(args.device)
    output = Path(args.output) if args.output is not None else eval_folder(args.checkpoint, args.model, args.split)
    check_outputs([output / 'eval.json', output / 'confusion_matrix.png'], [args.checkpoint, args.data],
                  force=args.force)
    result = evaluate_checkpoint(
        args.checkpoint, args.data, model=args.model, model_kwargs=args.model_kwargs, dataset=args.dataset,
        split=args.split, img_size=args.img_size, in_chans=args.in_chans, crop_pct=args.crop_pct,
        interpolation=args.interpolation, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
        device=args.device, output=str(output), on_bad_image=args.on_bad_image, agreement=args.agreement,
        pretrained=args.pretrained)
    print(f"settings: {result['sources']}", file=sys.stderr)
    t = result['transform']
    print(f"{result['model']} on {result['samples']} images ({result['data'] or result['dataset']}, split {args.split}; "
          f"resize {int(t['img_size'] / t['crop_pct'])} {t['interpolation']}, centre crop {t['img_size']})")
    print(f"top-1 {result['top1']:.2f}%   top-5 {result['top5']:.2f}%   loss {result['loss']:.4f}")
    if 'agreement' in result:
        a = result['agreement']
        print(f"{a['precision']} against fp32 on the same images: top-1 agreement {a['top1_agreement']:.2f}%; "
              f"fp32 top-1 {a['fp32_top1']:.2f}%; |logit difference| mean {a['mean_abs_logit_diff']:.2e}, "
              f"max {a['max_abs_logit_diff']:.2e}")
    if len(result['classes']) <= 100:
        print('per-class top-1:')
        for name, acc in zip(result['classes'], result['per_class_top1']):
            print(f'  {name:<24} {acc:6.2f}%')
    for path in result.get('files', []):
        print(f'wrote {path}')
    return 0


_CHECKPOINT_SUFFIXES = ('.pth.tar', '.pth', '.pt', '.tar', '.safetensors', '.bin', '.ckpt')


def eval_folder(checkpoint: Optional[str], model: Optional[str], split: str) -> Path:
    """Where `t2tvit eval` writes when no --output is given: it follows what is evaluated, so evaluating another
    checkpoint or split never meets an earlier result. Beside the checkpoint, `eval-NAME-SPLIT` (NAME: its file name
    without the suffix); for released weights (`--model TAG --pretrained`), `runs/eval/TAG-SPLIT`."""
    if checkpoint is None:
        return Path('runs') / 'eval' / f'{model}-{split}'
    path = Path(checkpoint)
    name = path.name
    for suffix in _CHECKPOINT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[:-len(suffix)]
            break
    return path.parent / f'eval-{name}-{split}'


# --- predict / export / visualize ----------------------------------------------------------------------------

def _restore(args: argparse.Namespace, labels: Optional[str] = None):
    from ..engine.restore import restore_model
    if args.checkpoint is None and not args.pretrained:
        print(f'warning: no --checkpoint given: {args.model or "the model"} has random weights', file=sys.stderr)
    return restore_model(args.checkpoint, args.model, args.model_kwargs, args.img_size, args.in_chans,
                         labels=labels, pretrained=args.pretrained)


def _print_settings(restored) -> None:
    """Where each setting that built and feeds the model came from (a flag, the checkpoint, the tag's cfg)."""
    print(f'settings: {restored.describe_sources()}', file=sys.stderr)


def _device(name: str) -> str:
    """The device `name` (auto, cpu, cuda) picks here; cuda without a visible GPU is the user's to fix."""
    from ..engine.config import ConfigError
    from ..engine.distributed import pick_device
    try:
        return str(pick_device(name))
    except RuntimeError as e:  # cuda asked for, none visible
        raise ConfigError(str(e)) from e


def _cmd_predict(args: argparse.Namespace) -> int:
    import json
    from ..tools.predict import predict_images
    check_weights_source(args.checkpoint, args.pretrained, args.model)
    device = _device(args.device)
    restored = _restore(args, labels=args.labels)
    result = predict_images(restored, args.images, topk=args.topk, batch_size=args.batch_size, device=device)
    _print_settings(restored)
    if args.json:
        print(json.dumps({'model': restored.name, 'checkpoint': restored.checkpoint,
                          'predictions': [p.as_dict() for p in result.predictions],
                          'failed': [{'image': path, 'error': why} for path, why in result.failed]}, indent=1))
    else:
        for prediction in result.predictions:
            print(prediction.image)
            for _, name, prob in prediction.top:
                print(f'  {100 * prob:6.2f}%  {name}')
    for path, why in result.failed:
        print(f'error: cannot read {path} ({why}); skipped it', file=sys.stderr)
    if result.failed:
        print(f'{len(result.failed)} of {len(result.failed) + len(result.predictions)} files could not be read '
              f'(listed above); replace or remove them', file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..tools.export import export_hf, export_model
    check_weights_source(args.checkpoint, args.pretrained, args.model, random_use='export')
    if args.static_hw and args.format != 'onnx':
        raise OptionError(f'--static-hw is for --format onnx; {args.format} always has a fixed height and width')
    if args.format != 'onnx-int8' and (args.dataset or args.data):
        raise OptionError('--dataset and --data are for --format onnx-int8 (its calibration images)')
    if args.format != 'onnx-int8' and args.int8_runtime != 'onnxruntime':
        raise OptionError('--int8-runtime is for --format onnx-int8: drop it, or export with --format onnx-int8')
    if args.format == 'onnx-int8':
        return _export_int8(args)
    restored = _restore(args)
    if args.format == 'hf':
        hub = export_hf(restored, args.output or restored.name.replace('.', '-'), tolerance=args.tolerance,
                        force=args.force)
        _print_settings(restored)
        print(f'wrote {hub.folder}: ' + ', '.join(p.name for p in hub.files))
        for shape, diff in hub.checks:
            print(f"  input {tuple(shape)}: max |create_model('local-dir:...') - source| = {diff:.2e}")
        return 0
    result = export_model(restored, args.format, args.output, dynamic_hw=False if args.static_hw else None,
                          onnx_exporter=args.onnx_exporter, opset=args.opset, tolerance=args.tolerance,
                          force=args.force)
    _print_settings(restored)
    size_mb = result.path.stat().st_size / 2 ** 20
    print(f'wrote {result.path} ({size_mb:.1f} MB) and {result.sidecar}')
    if result.format != 'safetensors':
        hw = (f'any height/width >= {result.min_side} px' if result.dynamic_hw
              else 'height/width fixed at {}x{}'.format(*restored.model.img_size))
        print(f'{result.path.name} takes any batch size, {hw}')
    for shape, diff in result.checks:
        print(f'  input {tuple(shape)}: max |exported - eager| = {diff:.2e}')
    if result.note:
        print(result.note)
    return 0


def _visualize_compare(args: argparse.Namespace) -> int:
    """`visualize IMAGE --compare A,B,...`: the models' feature maps side by side, with their invalid channels."""
    from ..engine.preflight import check_outputs
    from ..tools.compare import compare, parse_compare
    if len(args.images) != 1:
        raise OptionError('--compare draws one image: give exactly one IMAGE')
    stem, out = Path(args.images[0]).stem, Path(args.output)
    check_outputs([out / f'{stem}_compare.png', out / f'{stem}_compare.json'], args.images, force=args.force)
    record, files = compare(args.images[0], parse_compare(args.compare), args.output, channels=args.channels,
                            command=args.command_line)
    for row in record['models']:
        print(f"{row['label']}: " + ', '.join(f"{layer['layer']} {100 * layer['invalid_share']:.0f}% invalid"
                                           for layer in row['layers'] if layer['shown']))
    for path in files:
        print(f'wrote {path}')
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    from ..tools.quantize import check_calibration_source, export_int8, format_report
    check_calibration_source(args.dataset, args.data)
    restored = _restore(args)
    path, sidecar, report = export_int8(
        restored, args.dataset, args.data, args.output, calibration_images=args.calibration_images,
        eval_images=args.eval_images, onnx_exporter=args.onnx_exporter, opset=args.opset, tolerance=args.tolerance,
        force=args.force, runtime=args.int8_runtime)
    _print_settings(restored)
    print(f'wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MB) and {sidecar}')
    for line in format_report(report):
        print(line)
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from ..engine.preflight import check_outputs
    from ..tools.visualize import SKIMAGE_PHOTOS, visualize
    if args.compare is not None:
        return _visualize_compare(args)
    check_weights_source(args.checkpoint, args.pretrained, args.model, random_use='look at')
    stems = unique_stems([Path(p).stem for p in args.images] or list(SKIMAGE_PHOTOS))  # the names visualize writes
    out = Path(args.output)
    check_outputs([out / f'{stem}_{kind}.png' for stem in stems
                   for kind in ('feature_maps', 'attention', 'rollout', 't2t_attention')],
                  [*args.images, args.checkpoint], force=args.force)
    restored = _restore(args)
    files, explanations = visualize(restored, args.images, args.output, blocks=args.blocks, channels=args.channels)
    _print_settings(restored)
    for e in explanations:
        print(f"{e.name}: {', '.join(f'{name} {100 * p:.1f}%' for name, p in e.top)}")
    for path in files:
        print(f'wrote {path}')
    worst = max(e.max_error for e in explanations)
    print(f'attention recomputed in the hooks rebuilds every hooked layer output to within {worst:.1e}')
    return 0


# --- ablate -------------------------------------------------------------------------------------------------------

def _cmd_ablate(args: argparse.Namespace) -> int:
    from ..tools.ablate import run_ablation
    _device(args.device)
    if args.seed is not None and args.seeds:
        raise OptionError('give --seed N (one seed) or --seeds S,T,... , not both')
    kwargs = dict(args.model_kwargs or [])
    result = run_ablation(
        variants=args.variants, dataset=args.dataset, data=args.data, recipe=args.recipe, max_steps=args.max_steps,
        batch_size=args.batch_size, seeds=[args.seed] if args.seed is not None else (args.seeds or DEFAULT_SEEDS),
        train_images=args.train_images.split(','), sweep_variants=args.sweep_variants, model_kwargs=kwargs,
        scale=args.scale, img_size=args.img_size, name=args.name, output=args.output, device=args.device,
        throughput_batch=args.throughput_batch, throughput_seconds=args.throughput_seconds,
        overrides=dict(args.set or []), command=args.command_line, force=args.force)
    if result.files:
        print()
        print((result.folder / 'results.md').read_text())
        for path in result.files:
            print(f'wrote {path}')
    if result.interrupted:
        print('interrupted: run the same command again to resume (finished runs are not trained again)',
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _ablate_help() -> Tuple[str, str]:
    description = (
        "Train every variant once per seed with the same recipe, data and budget (the same number of optimizer\n"
        "steps), score each run's final weights on the validation (test) split, and measure each variant:\n"
        "parameters, MACs of one image (FLOPs / 2 from torch.utils.flop_counter) and inference images/s.\n"
        "Writes OUTPUT/ablate-NAME/results.{json,md} and PNG figures: per variant the mean top-1 with its 95%\n"
        "t-interval, the paired difference against t2t_vit_14, and a verdict (holds / does not hold /\n"
        "inconclusive) on each claim of the paper's Tables 6-7. --train-images 2000,10000,all adds a\n"
        "training-set-size sweep. Each run trains into OUTPUT/ablate-NAME/VARIANT/seedS-SIZE: rerunning resumes.\n\n"
        "Default: the 8 ideas below on Fashion-MNIST (data/fashion-mnist, 28 px, 1 channel), recipe fashion_mnist,\n"
        f"seeds {','.join(map(str, DEFAULT_SEEDS))}, {DEFAULT_STEPS} steps of 64 images per run, small-scale builds "
        "(25 minutes on 2 CPU cores, measured in docs/ablation.md).")
    lines = ['variants (small-scale build; * = run by default):']
    for name, variant in ABLATION_VARIANTS.items():
        mark = '*' if name in DEFAULT_VARIANTS else ' '
        lines.append(f'  {mark} {name:<20} {variant.idea}: {variant.note}')
    lines.append('data sets: ' + ', '.join(
        f"{name} ({d['img_size']} px, {d['in_chans']} ch)" for name, d in DATASET_DEFAULTS.items()))
    return description, '\n'.join(lines)


# --- benchmark ----------------------------------------------------------------------------------------------------

def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ..engine.preflight import check_bytes, check_memory
    from ..tools.benchmark import config_from_options, run_benchmark
    from ..tools.complexity import complexity_rows, format_complexity_table
    if args.complexity_only:
        print(format_complexity_table(complexity_rows()))
        return 0
    if args.data_loading:
        return _data_loading_benchmark(args)
    config = config_from_options(
        args.preset, args.smoke, models=args.models, peers=args.peers, train_models=args.train_models,
        runs=args.runs, batch_size=args.batch_size, img_size=args.img_size, device=args.device,
        threads=args.threads, warmup=args.warmup, reps=args.reps, iters=args.iters, ab=args.ab,
        agreement_images=args.agreement_images, peak_size=args.peak_size, reference=args.reference,
        checkpoints=dict(args.checkpoint) if args.checkpoint else None,
        variants_table=False if args.no_variants_table else None, output=args.output, stem=args.name,
        plot=False if args.no_plot else None)
    check_memory(config.img_size, 3, config.batch_size, config.device)
    check_bytes(3 * 4 * config.peak_size ** 2, f'--peak-size {config.peak_size} (three float32 matrices)',
                'lower --peak-size', config.device)
    run_benchmark(config)
    return 0


def _data_loading_benchmark(args: argparse.Namespace) -> int:
    from ..tools.loading_benchmark import format_loading_table, loading_benchmark, parse_rates
    try:
        rates = parse_rates(args.train_rate) if args.train_rate else None
    except ValueError as e:
        raise OptionError(f'--train-rate: {e}') from e
    models = args.models if args.models is not None else ['t2t_vit_7', 't2t_vit_14']
    result = loading_benchmark(images=args.loading_images, img_size=args.img_size or 224, models=models,
                               train_rates=rates, device=args.device or 'cpu', train_batch=args.batch_size)
    print()
    print(format_loading_table(result))
    return 0


# --- convert-data -------------------------------------------------------------------------------------------------

def _cmd_convert_data(args: argparse.Namespace) -> int:
    from ..data.convert import convert_data
    result = convert_data(args.dataset, args.data, args.to, args.output, shard_size=args.shard_size, force=args.force,
                          seed=args.seed, progress='on' if sys.stderr.isatty() else 'off')
    splits = ', '.join(f'{name} {n} samples in {result.shards[name]} shard(s)' for name, n in result.samples.items())
    print(f'wrote {result.output} ({args.to}): {splits}; {len(result.classes)} classes; '
          f'{result.bytes / 2 ** 20:.1f} MiB in {result.seconds:.1f} s')
    print(f"read it with --dataset {args.to} --data {result.output}")
    return 0


# --- parser -------------------------------------------------------------------------------------------------------

class _DefaultsAndLayoutHelp(argparse.HelpFormatter):
    """Keeps the line breaks of a text laid out by hand, wraps the others; each option's help names its default."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if '\n' in text:
            return ''.join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    options: Sequence[Option]
    run: Callable[[argparse.Namespace], int]
    epilog: Optional[str] = None
    recipe_keys: Tuple[str, ...] = ()  # recipe keys that are also flags (train, finetune)


def _recipe_description(name: str, help_text: str) -> str:
    return (help_text + '. Recipes: imagenet, cifar10, cifar100, fashion_mnist'
            + (', finetune (the base of every finetune run)' if name == 'finetune' else '') + ', or a YAML path. '
            'Recipe keys given as flags override the recipe; their values are YAML (1e-3, true, null, [0.5]).')


_TRAIN_HELP = 'train a model from a recipe (resumes an interrupted run)'
_FINETUNE_HELP = 'fine-tune a checkpoint to new classes, resolution or channels'
_ABLATE_DESCRIPTION, _ABLATE_EPILOG = _ablate_help()

COMMANDS: Dict[str, Command] = {c.name: c for c in (
    Command('info', 'list every variant with its parameter counts; optionally check fixtures',
            'Print every registered variant with parameter counts beside the paper, and optionally compare outputs '
            'with official reference checkpoints.', INFO, _cmd_info),
    Command('train', _TRAIN_HELP, _recipe_description('train', _TRAIN_HELP), TRAIN, _cmd_train,
            recipe_keys=tuple(RECIPE_OPTIONS)),
    Command('finetune', _FINETUNE_HELP, _recipe_description('finetune', _FINETUNE_HELP), FINETUNE, _cmd_finetune,
            recipe_keys=tuple(k for k in RECIPE_OPTIONS if k != 'pretrained')),
    Command('eval', 'evaluate a checkpoint: top-1/top-5, loss, per-class accuracy, confusion',
            "Evaluate a checkpoint with the model's own evaluation transform (ImageNet models: resize 248 bicubic, "
            'centre crop 224). Writes OUTPUT/eval.json and OUTPUT/confusion_matrix.png, OUTPUT by default a folder '
            'beside the checkpoint named for it and the split; existing ones are kept unless --force.',
            EVAL, _cmd_eval),
    Command('predict', 'top-k labels for images or folders of images',
            "Top-k labels with probabilities for image files and folders (searched recursively), through the "
            "model's own evaluation transform. Exit status 1 when some files could not be read (they are named and "
            'skipped, as are FIFOs, devices and sockets, which are never opened).', PREDICT, _cmd_predict),
    Command('export', 'export to ONNX, TorchScript, a torch.export program, safetensors or a hub folder',
            'Export a model, check the written file against the eager model (two batch sizes, and a second image '
            'size where height/width are dynamic), and write it atomically with FILE.json: preprocessing, class '
            'names, input/output names. An existing FILE is kept unless --force; the checkpoint is never '
            'overwritten.', EXPORT, _cmd_export),
    Command('visualize', 'feature maps (paper Fig. 2), attention per head, rollout, T2T attention',
            'Write, per image, NAME_feature_maps.png (T2T stages at strides 4 and 8 and chosen blocks, channels as '
            'a grid), NAME_attention.png (class-token attention per head), NAME_rollout.png (attention rollout over '
            'all blocks) and NAME_t2t_attention.png (T2T attention of a few query tokens; implied by the kernel for '
            "Performer models). Without IMAGE: scikit-image's astronaut, chelsea and coffee photos.",
            VISUALIZE, _cmd_visualize),
    Command('ablate', "the paper's design study on a small data set: train variants, compare them",
            _ABLATE_DESCRIPTION, ABLATE, _cmd_ablate, epilog=_ABLATE_EPILOG),
    Command('benchmark', 'complexity table; throughput, memory and MFU beside timm peers (CPU or GPU)',
            'Print parameters and MACs of every variant, then time inference and training steps of T2T-ViT and '
            'timm peers interleaved in one process, with the matmul peak of the same machine; write JSON and a PNG. '
            'Presets: cpu (make bench, a few minutes on 2 cores), gpu (make bench-gpu). Options given override the '
            'preset.', BENCHMARK, _cmd_benchmark),
    Command('convert-data', 'write a data set as WebDataset shards or a Hugging Face (parquet) dataset',
            "Convert an image folder, CIFAR or MNIST/Fashion-MNIST IDX files into WebDataset tar shards (--to wds: "
            "SPLIT-000000.tar and timm's _info.json) or a Hugging Face dataset folder (--to hfds: "
            'data/SPLIT-00000-of-000NN.parquet with image and ClassLabel columns), keeping the splits and class '
            'names. Written into a hidden folder and renamed when complete. Then train with --dataset wds|hfds '
            '--data OUTPUT.', CONVERT_DATA, _cmd_convert_data),
)}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every command; with `command`, only that one gets its options (the others keep their names
    and help lines), which is all one command line needs."""
    parser = _Parser(prog='t2tvit', description='Tokens-to-Token ViT: train, evaluate and fine-tune; model facts '
                     'and checks.')
    parser.add_argument('--debug', action='store_true', help='on an unexpected error, print the full traceback')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND', parser_class=_Parser)
    for spec in COMMANDS.values():
        p = sub.add_parser(spec.name, help=spec.help, description=spec.description, epilog=spec.epilog,
                           formatter_class=_DefaultsAndLayoutHelp)
        p.set_defaults(func=spec.run)
        if command is not None and spec.name != command:
            continue
        for option in spec.options:
            option.add_to(p)
        if spec.recipe_keys:
            group = p.add_argument_group('recipe keys (override the recipe; values are YAML: 1e-3, true, null, '
                                         '[1,2])')
            for key in spec.recipe_keys:
                RECIPE_OPTIONS[key].add_to(group, default=argparse.SUPPRESS)
    return parser


# --- the error boundary -------------------------------------------------------------------------------------------

def _out_of_memory(e: BaseException) -> bool:
    """Memory ran out: Python's MemoryError, torch's OutOfMemoryError (a GPU), an OSError ENOMEM, or the CPU
    allocator's RuntimeError, which torch gives no class of its own (so its text is the only sign)."""
    torch = sys.modules.get('torch')
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
        return True
    if isinstance(e, OSError):
        return e.errno == errno.ENOMEM
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("can't allocate memory", 'Cannot allocate memory',
                                                                   'out of memory'))


def _write_traceback(e: BaseException) -> Path:
    folder = Path(tempfile.gettempdir())
    path = folder / f't2tvit-error-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}.txt'
    path.write_text(f"t2tvit {' '.join(sys.argv[1:])}\n\n" + ''.join(traceback.format_exception(e)))
    return path


def _one_line(e: BaseException) -> str:
    """The message on one line; the type is named where the message alone would not explain it."""
    text = ' '.join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    if isinstance(e, KeyError) or not text:
        return f'{type(e).__name__}: {e!r}'
    return text


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv[:1] or os.environ.get('T2TVIT_DEBUG') == '1'
    try:
        command = next((a for a in argv if not a.startswith('-')), None)
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        args.command_line = shlex.join(['t2tvit', *argv])  # recorded by the commands that write a study
        with command_outputs():  # an output name claimed twice in one command is refused
            return args.func(args)
    except UsageError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error('stopped at once by a second Ctrl-C; rerun the same command to resume from last.pth',
                      EXIT_INTERRUPTED)
    except InputError as e:
        return _error(_one_line(e))
    except TrainingDiverged as e:
        return _error(str(e), EXIT_DIVERGED)
    except PeerLost as e:
        return _error(_one_line(e), EXIT_PEER_LOST)
    except Exception as e:  # noqa: BLE001  (the boundary: every failure becomes one line)
        if _out_of_memory(e):
            return _error(f'out of memory ({_one_line(e)}); lower --batch-size or --img-size')
        return _unexpected(e, debug)


def _unexpected(e: BaseException, debug: bool) -> int:
    """A bug: the traceback printed (--debug) or written to a file, and one line saying where."""
    if debug:
        traceback.print_exception(e)
        return EXIT_UNEXPECTED
    try:
        where = f'the full traceback is in {_write_traceback(e)}'
    except OSError:
        where = 'rerun with --debug to see the full traceback'
    return _error(f'unexpected {type(e).__name__}: {_one_line(e)} ({where})', EXIT_UNEXPECTED)


if __name__ == '__main__':
    sys.exit(main())
