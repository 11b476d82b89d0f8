"""`t2tvit` command line: each subcommand parses its flags and calls one library function."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

EXIT_ERROR = 2  # bad input: config, data, checkpoint
EXIT_DIVERGED = 3


def _error(message: str, code: int = EXIT_ERROR) -> int:
    print(f'error: {message}', file=sys.stderr)
    return code


# --- info ---------------------------------------------------------------------------------------------------------

def _cmd_info(args: argparse.Namespace) -> int:
    from ..tools.info import format_fixture_table, format_variant_table, variant_rows, verify_official_fixtures
    print(format_variant_table(variant_rows(with_tags=not args.no_tags)))
    if args.fixtures is not None:
        official = Path(args.fixtures)
        if not (official / 'tiny_configs.json').is_file():
            return _error(f'{official} holds no tiny_configs.json; point --fixtures at the official fixtures folder')
        rows = verify_official_fixtures(official)
        print()
        print(format_fixture_table(rows, tolerance=args.tolerance))
        worst = max(max(r.pre_logits_max_abs_diff, r.logits_max_abs_diff) for r in rows)
        if worst > args.tolerance:
            return _error(f'outputs differ from the official ones by {worst:.2e} > {args.tolerance:.0e}', 1)
    return 0


# --- train / finetune ---------------------------------------------------------------------------------------------

def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple = ()) -> None:
    """One flag per config key (`lr_base_size` -> `--lr-base-size`); values are read as YAML."""
    from ..engine.config import DEFAULTS, HELP, parse_value
    group = parser.add_argument_group('recipe keys (override the recipe; values are YAML: 1e-3, true, null, [1,2])')
    for key in DEFAULTS:
        if key in skip:
            continue
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=parse_value, default=None, metavar='V',
                           help=f'{HELP[key]} (default: {DEFAULTS[key]!r})')


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    from ..engine.config import DEFAULTS
    return {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}


def _run_training(config: Dict[str, Any], resume: Optional[str]) -> int:
    from ..engine.train import TrainingDiverged, train
    try:
        result = train(config, resume=resume)
    except TrainingDiverged as e:
        return _error(str(e), EXIT_DIVERGED)
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
        return 128 + signal.SIGINT
    if result.status == 'budget':
        print(f'stopped at max_steps={config["max_steps"]}: raise --max-steps and rerun the same command to continue')
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..engine.config import resolve_config
    config = resolve_config(args.config, _overrides(args))
    return _run_training(config, _resume_arg(args))


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..engine.config import load_recipe, resolve_config
    overrides = _overrides(args)
    overrides['pretrained'] = args.checkpoint
    config = resolve_config(args.config, overrides, base=load_recipe('finetune'))
    if config['recipe'] is None:
        config['recipe'] = 'finetune'
    return _run_training(config, _resume_arg(args))


def _resume_arg(args: argparse.Namespace) -> Optional[str]:
    if args.no_resume:
        return None
    return args.resume or 'auto'


# --- eval ---------------------------------------------------------------------------------------------------------

def _cmd_eval(args: argparse.Namespace) -> int:
    from ..engine.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(
        args.checkpoint, args.data, model=args.model, model_kwargs=args.model_kwargs, dataset=args.dataset, split=args.split, img_size=args.img_size,
        in_chans=args.in_chans, crop_pct=args.crop_pct, interpolation=args.interpolation,
        batch_size=args.batch_size, workers=args.workers, amp=args.amp, device=args.device, output=args.output,
        on_bad_image=args.on_bad_image)
    t = result['transform']
    print(f"{result['model']} on {result['samples']} images ({args.data}, split {args.split}; "
          f"resize {int(t['img_size'] / t['crop_pct'])} {t['interpolation']}, centre crop {t['img_size']})")
    print(f"top-1 {result['top1']:.2f}%   top-5 {result['top5']:.2f}%   loss {result['loss']:.4f}")
    if len(result['classes']) <= 100:
        print('per-class top-1:')
        for name, acc in zip(result['classes'], result['per_class_top1']):
            print(f'  {name:<24} {acc:6.2f}%')
    for path in result.get('files', []):
        print(f'wrote {path}')
    return 0


def _yaml_mapping(text: str) -> Dict[str, Any]:
    from ..engine.config import parse_value
    value = parse_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'{text!r} is not a YAML mapping such as "{{depth: 2}}"')
    return value


# --- benchmark ----------------------------------------------------------------------------------------------------

def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ..tools.benchmark import BenchmarkError, config_from_options, parse_checkpoints, run_benchmark
    from ..tools.complexity import complexity_rows, format_complexity_table
    if args.complexity_only:
        print(format_complexity_table(complexity_rows()))
        return 0
    try:
        config = config_from_options(
            args.preset, args.smoke, models=args.models, peers=args.peers, train_models=args.train_models,
            runs=args.runs, batch_size=args.batch_size, img_size=args.img_size, device=args.device,
            threads=args.threads, warmup=args.warmup, reps=args.reps, iters=args.iters, ab=args.ab,
            agreement_images=args.agreement_images, peak_size=args.peak_size, reference=args.reference,
            checkpoints=parse_checkpoints(args.checkpoint) if args.checkpoint else None,
            variants_table=False if args.no_variants_table else None, output=args.output, stem=args.name,
            plot=False if args.no_plot else None)
        run_benchmark(config)
    except BenchmarkError as e:
        return _error(str(e))
    return 0


def _name_list(text: str) -> List[str]:
    return [] if text.strip().lower() == 'none' else [t.strip() for t in text.split(',') if t.strip()]


# --- parser -------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='t2tvit', description='Tokens-to-Token ViT: train, evaluate and fine-tune; model facts and checks.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    info = sub.add_parser('info', help='list every variant with its parameter counts; optionally check fixtures',
                          description='Print every registered variant with parameter counts beside the paper, '
                                      'and optionally compare outputs with official reference checkpoints.')
    info.add_argument('--fixtures', metavar='DIR', default=None,
                      help='folder with tiny_configs.json and official *.pth.tar/_io.pt files to check against')
    info.add_argument('--tolerance', type=float, default=1e-5, help='largest allowed abs difference (default 1e-5)')
    info.add_argument('--no-tags', action='store_true', help='list only the base names, not the .in1k_384 tags')
    info.set_defaults(func=_cmd_info)

    for name, help_text in (('train', 'train a model from a recipe (resumes an interrupted run)'),
                            ('finetune', 'fine-tune a checkpoint to new classes, resolution or channels')):
        p = sub.add_parser(
            name, help=help_text, description=help_text + '. Recipes: imagenet, cifar10, cifar100, fashion_mnist'
            + (', finetune (the default base for finetune)' if name == 'finetune' else '') + ', or a YAML path.',
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument('--config', '-c', metavar='RECIPE', default='fashion_mnist' if name == 'train' else None,
                       help='recipe name or YAML file')
        if name == 'finetune':
            p.add_argument('--checkpoint', required=True, metavar='FILE', help='checkpoint to start from')
        p.add_argument('--resume', metavar='FILE', default=None,
                       help='resume from this checkpoint (default: RUN_DIR/last.pth when it exists)')
        p.add_argument('--no-resume', action='store_true', help='start afresh; refuse an existing run folder')
        _add_config_flags(p, skip=('pretrained',) if name == 'finetune' else ())
        p.set_defaults(func=_cmd_train if name == 'train' else _cmd_finetune)

    ev = sub.add_parser('eval', help='evaluate a checkpoint: top-1/top-5, loss, per-class accuracy, confusion',
                        description='Evaluate a checkpoint with the model\'s own evaluation transform '
                                    '(ImageNet models: resize 248 bicubic, centre crop 224).')
    ev.add_argument('--checkpoint', required=True, metavar='FILE')
    ev.add_argument('--data', metavar='DIR', default=None, help='data set folder')
    ev.add_argument('--model', default=None, help='model name (default: what the checkpoint says)')
    ev.add_argument('--model-kwargs', type=_yaml_mapping, default=None, metavar='YAML',
                    help="extra builder arguments, e.g. '{embed_dim: 64, depth: 2}' (default: from the checkpoint)")
    ev.add_argument('--dataset', default=None,
                    help='imagefolder | cifar10 | cifar100 | mnist | fashion_mnist | fake (default: from the '
                         'checkpoint, else imagefolder)')
    ev.add_argument('--split', default='val', choices=('val', 'test', 'train'))
    ev.add_argument('--img-size', type=int, default=None)
    ev.add_argument('--in-chans', type=int, default=None)
    ev.add_argument('--crop-pct', type=float, default=None)
    ev.add_argument('--interpolation', default=None)
    ev.add_argument('--batch-size', type=int, default=64)
    ev.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1))
    ev.add_argument('--amp', default='none', choices=('none', 'bf16', 'fp16'))
    ev.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    ev.add_argument('--on-bad-image', default='fail', choices=('fail', 'skip'))
    ev.add_argument('--output', default='runs/eval', metavar='DIR', help='where eval.json and the PNG go')
    ev.set_defaults(func=_cmd_eval)

    bench = sub.add_parser(
        'benchmark', help='complexity table; throughput, memory and MFU beside timm peers (CPU or GPU)',
        description='Print parameters and MACs of every variant, then time inference and training steps of T2T-ViT '
                    'and timm peers interleaved in one process, with the matmul peak of the same machine; write JSON '
                    'and a PNG. Presets: cpu (make bench, a few minutes on 2 cores), gpu (make bench-gpu). '
                    'Options given override the preset.')
    bench.add_argument('--preset', default='cpu', choices=('cpu', 'gpu'), help='starting values (default: cpu)')
    bench.add_argument('--smoke', action='store_true',
                       help='toy sizes (batch 2, 64 px, 2 rounds): checks the code path, e.g. of --preset gpu on a CPU')
    bench.add_argument('--complexity-only', action='store_true',
                       help='print the parameter and MAC table of every variant at 224 and 384 px, and stop')
    bench.add_argument('--models', type=_name_list, metavar='LIST', help='T2T-ViT variants, comma-separated, or none')
    bench.add_argument('--peers', type=_name_list, metavar='LIST', help='timm models to time beside them, or none')
    bench.add_argument('--train-models', type=_name_list, metavar='LIST',
                       help='which of the models and peers train runs time (default: the preset\'s)')
    bench.add_argument('--runs', metavar='LIST',
                       help='MODE:PRECISION[:COMPILE] items: infer|train, fp32|bf16, eager|compiled; '
                            'e.g. infer:fp32,infer:bf16,train:fp32')
    bench.add_argument('--batch-size', type=int)
    bench.add_argument('--img-size', type=int)
    bench.add_argument('--device', choices=('cpu', 'cuda'))
    bench.add_argument('--threads', type=int, help='CPU threads (default: one per core)')
    bench.add_argument('--warmup', type=int, help='untimed steps per model before timing (the first compiles)')
    bench.add_argument('--reps', type=int, help='timed rounds; each runs every model once')
    bench.add_argument('--iters', type=int, help='steps per model per round')
    bench.add_argument('--ab', metavar='PATHS',
                       help='also time a copy of each T2T-ViT with these fast paths off, side by side: '
                            'comma-separated names (an unknown one lists them), or all')
    bench.add_argument('--agreement-images', type=int, metavar='N',
                       help='images for the bf16-vs-fp32 top-1 agreement (0: skip)')
    bench.add_argument('--checkpoint', action='append', metavar='NAME=FILE',
                       help='weights for one model (repeatable), e.g. for a meaningful bf16 agreement')
    bench.add_argument('--peak-size', type=int, metavar='N', help='side of the square GEMM that measures the peak')
    bench.add_argument('--reference', metavar='NAME', help='model the others are divided by, round by round')
    bench.add_argument('--no-variants-table', action='store_true', help='skip the table of every variant')
    bench.add_argument('--output', metavar='DIR',
                       help="folder for JSON and PNG (default: benchmarks; 'none': no files)")
    bench.add_argument('--name', metavar='STEM', help='file name without suffix (default: DEVICE-DATE)')
    bench.add_argument('--no-plot', action='store_true', help='no PNG')
    bench.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data import DataError
    from ..engine.checkpointing import CheckpointSaveError
    from ..engine.config import ConfigError
    from ..models import CheckpointError
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, CheckpointSaveError, FileNotFoundError) as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error('stopped at once by a second Ctrl-C; rerun the same command to resume from last.pth',
                      128 + signal.SIGINT)


if __name__ == '__main__':
    sys.exit(main())
