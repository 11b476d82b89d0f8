"""`t2tvit` command line: each subcommand parses its flags and calls one library function."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
    overrides['pretrained'] = _weights_source(args, overrides.get('model'))
    config = resolve_config(args.config, overrides, base=load_recipe('finetune'))
    if config['recipe'] is None:
        config['recipe'] = 'finetune'
    return _run_training(config, _resume_arg(args))


def _resume_arg(args: argparse.Namespace) -> Optional[str]:
    if args.no_resume:
        return None
    return args.resume or 'auto'


def _weights_source(args: argparse.Namespace, model: Optional[str]) -> str:
    """finetune: --checkpoint FILE, or --pretrained with --model TAG (its released weights)."""
    from ..engine.config import ConfigError
    if args.pretrained and args.checkpoint:
        raise ConfigError('give either --checkpoint FILE or --pretrained (the released weights of --model), not both')
    if args.pretrained:
        if not model:
            raise ConfigError("--pretrained needs --model TAG, e.g. t2t_vit_14.in1k (timm.list_pretrained('t2t*'))")
        return model
    if not args.checkpoint:
        raise ConfigError('give --checkpoint FILE to start from, or --model TAG --pretrained')
    return args.checkpoint


def _add_pretrained_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--pretrained', action='store_true',
                        help="use the released weights of --model, a pretrained tag such as t2t_vit_14.in1k "
                             "(downloaded once into timm's cache; timm.list_pretrained('t2t*') lists them)")


# --- eval ---------------------------------------------------------------------------------------------------------

def _cmd_eval(args: argparse.Namespace) -> int:
    from ..engine.config import ConfigError
    from ..engine.evaluate import evaluate_checkpoint
    if args.checkpoint is None and not args.pretrained:
        raise ConfigError('give --checkpoint FILE, or --model TAG --pretrained for released weights')
    result = evaluate_checkpoint(
        args.checkpoint, args.data, model=args.model, model_kwargs=args.model_kwargs, dataset=args.dataset, split=args.split, img_size=args.img_size,
        in_chans=args.in_chans, crop_pct=args.crop_pct, interpolation=args.interpolation,
        batch_size=args.batch_size, workers=args.workers, amp=args.amp, device=args.device, output=args.output,
        on_bad_image=args.on_bad_image, agreement=args.agreement, pretrained=args.pretrained)
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


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of whole numbers, e.g. 0,6,13') \
            from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of at least 1')
    return value


def _yaml_mapping(text: str) -> Dict[str, Any]:
    from ..engine.config import parse_value
    value = parse_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'{text!r} is not a YAML mapping such as "{{depth: 2}}"')
    return value


# --- predict / export / visualize ----------------------------------------------------------------------------

def _add_model_flags(parser: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    parser.add_argument('--checkpoint', required=checkpoint_required, metavar='FILE',
                        help='t2tvit or official checkpoint, .pth/.pth.tar/.safetensors'
                             + ('' if checkpoint_required else ' (default: random weights, with a warning)'))
    parser.add_argument('--model', default=None,
                        help='model name or pretrained tag (default: what the checkpoint says)')
    _add_pretrained_flag(parser)
    parser.add_argument('--model-kwargs', type=_yaml_mapping, default=None, metavar='YAML',
                        help="extra builder arguments, e.g. '{embed_dim: 64, depth: 2}' (default: from the checkpoint)")
    parser.add_argument('--img-size', type=int, default=None, help='input size (default: from the checkpoint)')
    parser.add_argument('--in-chans', type=int, default=None, help='input channels (default: from the checkpoint)')


def _restore(args: argparse.Namespace, labels: Optional[str] = None):
    from ..engine.restore import restore_model
    if args.checkpoint is None and not args.pretrained:
        print(f'warning: no --checkpoint given: {args.model or "the model"} has random weights', file=sys.stderr)
    restored = restore_model(args.checkpoint, args.model, args.model_kwargs, args.img_size, args.in_chans,
                             labels=labels, pretrained=args.pretrained)
    print(f'settings: {restored.describe_sources()}', file=sys.stderr)
    return restored


def _device(name: str) -> str:
    from ..engine.config import ConfigError
    from ..engine.distributed import pick_device
    try:
        return str(pick_device(name))
    except RuntimeError as e:  # cuda asked for, none visible
        raise ConfigError(str(e)) from e


def _cmd_predict(args: argparse.Namespace) -> int:
    import json
    from ..engine.config import ConfigError
    from ..tools.predict import predict_images
    if args.checkpoint is None and not args.pretrained:
        raise ConfigError('give --checkpoint FILE, or --model TAG --pretrained for released weights')
    restored = _restore(args, labels=args.labels)
    result = predict_images(restored, args.images, topk=args.topk, batch_size=args.batch_size,
                            device=_device(args.device))
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
    restored = _restore(args)
    if args.format == 'hf':
        hub = export_hf(restored, args.output or restored.name.replace('.', '-'), tolerance=args.tolerance)
        print(f'wrote {hub.folder}: ' + ', '.join(p.name for p in hub.files))
        for shape, diff in hub.checks:
            print(f"  input {tuple(shape)}: max |create_model('local-dir:...') - source| = {diff:.2e}")
        return 0
    result = export_model(restored, args.format, args.output, dynamic_hw=False if args.static_hw else None,
                          onnx_exporter=args.onnx_exporter, opset=args.opset, tolerance=args.tolerance)
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


def _cmd_visualize(args: argparse.Namespace) -> int:
    from ..engine.config import ConfigError
    from ..tools.visualize import visualize
    if args.checkpoint is None and args.model is None:
        raise ConfigError('give --checkpoint FILE, or --model NAME to look at a randomly initialised model '
                          '(--model TAG --pretrained: its released weights)')
    restored = _restore(args)
    files, explanations = visualize(restored, args.images, args.output, blocks=args.blocks, channels=args.channels)
    for e in explanations:
        print(f"{e.name}: {', '.join(f'{name} {100 * p:.1f}%' for name, p in e.top)}")
    for path in files:
        print(f'wrote {path}')
    worst = max(e.max_error for e in explanations)
    print(f'attention recomputed in the hooks rebuilds every hooked layer output to within {worst:.1e}')
    return 0

# --- ablate -------------------------------------------------------------------------------------------------------

def _comma_list(text: str) -> List[str]:
    return [v.strip() for v in text.split(',') if v.strip()]


def _key_value(text: str):
    from ..engine.config import parse_value
    key, sep, value = text.partition('=')
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE, e.g. lr=1e-3')
    return key.strip().replace('-', '_'), parse_value(value)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from ..tools.ablate import run_ablation
    result = run_ablation(
        variants=args.variants, dataset=args.dataset, data=args.data, recipe=args.recipe, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed, scale=args.scale,
        img_size=args.img_size, name=args.name, output=args.output, device=args.device,
        throughput_batch=args.throughput_batch, throughput_seconds=args.throughput_seconds,
        overrides=dict(args.set or []))
    if result.files:
        print()
        print((result.folder / 'results.md').read_text())
        for path in result.files:
            print(f'wrote {path}')
    if result.interrupted:
        print('interrupted: run the same command again to resume (finished variants are not trained again)',
              file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


class _DefaultsAndLayoutHelp(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows each flag's default (flags without one explain theirs)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and '%(default)' not in text:
            text += ' (default: %(default)s)'
        return text


def _ablate_help() -> Tuple[str, str]:
    from ..tools.ablate import ABLATION_VARIANTS, DATASET_DEFAULTS, DEFAULT_VARIANTS
    description = (
        "Train a set of variants with one recipe on one data set (same seed, same budget), then measure each:\n"
        "parameters (frozen tensors included, as the paper counts), MACs of one image (FLOPs / 2 from\n"
        "torch.utils.flop_counter), inference images/s (a short timed loop) and top-1 on the validation/test\n"
        "split. Writes OUTPUT/ablate-NAME/results.{json,md,png} with the paper's ImageNet numbers (Tables 6 and 7)\n"
        "beside ours; each variant trains into OUTPUT/ablate-NAME/VARIANT, so rerunning resumes.\n\n"
        "Default: the 8 ideas below on Fashion-MNIST (data/fashion-mnist, 28 px, 1 channel), recipe fashion_mnist,\n"
        "1 epoch each (937 steps of 64 images), small-scale builds; measured at 11.5 minutes on 2 CPU cores.")
    lines = ['variants (small-scale build; * = run by default):']
    for name, variant in ABLATION_VARIANTS.items():
        mark = '*' if name in DEFAULT_VARIANTS else ' '
        lines.append(f'  {mark} {name:<20} {variant.idea}: {variant.note}')
    lines.append('data sets: ' + ', '.join(
        f"{name} ({d['img_size']} px, {d['in_chans']} ch)" for name, d in DATASET_DEFAULTS.items()))
    return description, '\n'.join(lines)

# --- convert-data -------------------------------------------------------------------------------------------------

def _cmd_convert_data(args: argparse.Namespace) -> int:
    from ..data.convert import convert_data
    result = convert_data(args.dataset, args.data, args.to, args.output, shard_size=args.shard_size, force=args.force,
                          seed=args.seed, progress='on' if sys.stderr.isatty() else 'off')
    splits = ', '.join(f'{name} {n} samples in {result.shards[name]} shard(s)' for name, n in result.samples.items())
    print(f'wrote {result.output} ({args.to}): {splits}; {len(result.classes)} classes; '
          f'{result.bytes / 2 ** 20:.1f} MiB in {result.seconds:.1f} s')
    read_as = 'wds' if args.to == 'wds' else 'hfds'
    print(f'read it with --dataset {read_as} --data {result.output}')
    return 0


def _add_convert_data_parser(sub) -> None:
    from ..data.convert import CONVERT_FORMATS, DEFAULT_SHARD_SIZE, SOURCE_DATASETS
    cv = sub.add_parser(
        'convert-data', help='write a data set as WebDataset shards or a Hugging Face (parquet) dataset',
        description='Convert an image folder, CIFAR or MNIST/Fashion-MNIST IDX files into WebDataset tar shards '
                    '(--to wds: SPLIT-000000.tar and timm\'s _info.json) or a Hugging Face dataset folder (--to hfds: '
                    'data/SPLIT-00000-of-000NN.parquet with image and ClassLabel columns), keeping the splits and '
                    'class names. Written into a hidden folder and renamed when complete. Then train with '
                    '--dataset wds|hfds --data OUTPUT.')
    cv.add_argument('--dataset', required=True, choices=SOURCE_DATASETS, help='what --data holds')
    cv.add_argument('--data', metavar='SRC', default=None, help='the source folder (as train/eval read it)')
    cv.add_argument('--to', required=True, choices=CONVERT_FORMATS, help='wds (tar shards) or hfds (parquet)')
    cv.add_argument('--output', '-o', required=True, metavar='OUT', help='folder to create')
    cv.add_argument('--shard-size', type=_positive_int, default=DEFAULT_SHARD_SIZE,
                    help=f'samples per tar or parquet file (default {DEFAULT_SHARD_SIZE})')
    cv.add_argument('--seed', type=int, default=0, help='seed of the shuffled order of training samples (default 0)')
    cv.add_argument('--force', action='store_true', help='replace OUT if it exists (once the new one is complete)')
    cv.set_defaults(func=_cmd_convert_data)


# --- benchmark ----------------------------------------------------------------------------------------------------

def _cmd_benchmark(args: argparse.Namespace) -> int:
    from ..tools.benchmark import BenchmarkError, config_from_options, parse_checkpoints, run_benchmark
    from ..tools.complexity import complexity_rows, format_complexity_table
    if args.complexity_only:
        print(format_complexity_table(complexity_rows()))
        return 0
    if args.data_loading:
        return _data_loading_benchmark(args)
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


def _data_loading_benchmark(args: argparse.Namespace) -> int:
    from ..tools.loading_benchmark import format_loading_table, loading_benchmark, parse_rates
    try:
        rates = parse_rates(args.train_rate) if args.train_rate else None
    except ValueError as e:
        return _error(f'--train-rate: {e}')
    models = args.models if args.models is not None else ['t2t_vit_7', 't2t_vit_14']
    result = loading_benchmark(images=args.loading_images, img_size=args.img_size or 224, models=models,
                               train_rates=rates, device=args.device or 'cpu', train_batch=args.batch_size)
    print()
    print(format_loading_table(result))
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
            p.add_argument('--checkpoint', metavar='FILE', help='checkpoint to start from')
            _add_pretrained_flag(p)
        p.add_argument('--resume', metavar='FILE', default=None,
                       help='resume from this checkpoint (default: RUN_DIR/last.pth when it exists)')
        p.add_argument('--no-resume', action='store_true', help='start afresh; refuse an existing run folder')
        _add_config_flags(p, skip=('pretrained',) if name == 'finetune' else ())
        p.set_defaults(func=_cmd_train if name == 'train' else _cmd_finetune)

    ev = sub.add_parser('eval', help='evaluate a checkpoint: top-1/top-5, loss, per-class accuracy, confusion',
                        description='Evaluate a checkpoint with the model\'s own evaluation transform '
                                    '(ImageNet models: resize 248 bicubic, centre crop 224).')
    ev.add_argument('--checkpoint', metavar='FILE', help='checkpoint to evaluate (or --model TAG --pretrained)')
    ev.add_argument('--data', metavar='DIR', default=None, help='data set folder')
    ev.add_argument('--model', default=None, help='model name or pretrained tag (default: what the checkpoint says)')
    _add_pretrained_flag(ev)
    ev.add_argument('--model-kwargs', type=_yaml_mapping, default=None, metavar='YAML',
                    help="extra builder arguments, e.g. '{embed_dim: 64, depth: 2}' (default: from the checkpoint)")
    ev.add_argument('--dataset', default=None,
                    help='imagefolder | cifar10 | cifar100 | mnist | fashion_mnist | fake | wds | hfds (default: '
                         'from the checkpoint, else imagefolder)')
    ev.add_argument('--split', default='val', choices=('val', 'test', 'train'))
    ev.add_argument('--img-size', type=int, default=None)
    ev.add_argument('--in-chans', type=int, default=None)
    ev.add_argument('--crop-pct', type=float, default=None)
    ev.add_argument('--interpolation', default=None)
    ev.add_argument('--batch-size', type=int, default=64)
    ev.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1))
    ev.add_argument('--amp', default='none', choices=('none', 'bf16', 'fp16'))
    ev.add_argument('--agreement', action='store_true',
                    help='with --amp: also run each batch in fp32 and report how often the top-1 classes agree')
    ev.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    ev.add_argument('--on-bad-image', default='fail', choices=('fail', 'skip'))
    ev.add_argument('--output', default='runs/eval', metavar='DIR', help='where eval.json and the PNG go')
    ev.set_defaults(func=_cmd_eval)

    pr = sub.add_parser('predict', help='top-k labels for images or folders of images',
                        description='Top-k labels with probabilities for image files and folders (searched '
                                    'recursively), through the model\'s own evaluation transform. Exit status 1 '
                                    'when some files could not be read (they are named and skipped).')
    pr.add_argument('images', nargs='+', metavar='IMAGE_OR_DIR')
    _add_model_flags(pr, checkpoint_required=False)
    pr.add_argument('--topk', type=_positive_int, default=5, help='how many classes to list per image (default 5)')
    pr.add_argument('--labels', metavar='FILE', default=None,
                    help='class names, one per line in index order (default: from the checkpoint, the data set, '
                         'or ImageNet-1k for 1000-class models)')
    pr.add_argument('--json', action='store_true', help='print one JSON document instead of text')
    pr.add_argument('--batch-size', type=_positive_int, default=32)
    pr.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    pr.set_defaults(func=_cmd_predict)

    exp = sub.add_parser('export', help='export to ONNX, TorchScript, a torch.export program or safetensors',
                         description='Export a model, check the written file against the eager model (two batch '
                                     'sizes, and a second image size where height/width are dynamic), and write it '
                                     'atomically with FILE.json: preprocessing, class names, input/output names.')
    exp.add_argument('--format', required=True,
                     choices=('onnx', 'torchscript', 'exported-program', 'safetensors', 'hf'),
                     help='hf: a Hugging Face hub model folder (config.json, model.safetensors, README.md) that '
                          "timm.create_model('local-dir:DIR', pretrained=True) loads")
    _add_model_flags(exp, checkpoint_required=False)
    exp.add_argument('--output', '-o', metavar='FILE', default=None,
                     help='file or existing folder (default: MODEL.onnx / .pt / .pt2 / .safetensors here)')
    exp.add_argument('--static-hw', action='store_true',
                     help='ONNX: fix height/width at the model size (default: any size, batch always dynamic)')
    exp.add_argument('--onnx-exporter', default='dynamo', choices=('dynamo', 'legacy'),
                     help='dynamo (default: dynamic height/width) or the legacy TorchScript-based one '
                          '(fixed height/width, faster to export)')
    exp.add_argument('--opset', type=int, default=18, help='ONNX opset (default 18)')
    exp.add_argument('--tolerance', type=float, default=1e-4,
                     help='largest allowed |exported - eager| in the check (default 1e-4)')
    exp.set_defaults(func=_cmd_export)

    vz = sub.add_parser('visualize', help="feature maps (paper Fig. 2), attention per head, rollout, T2T attention",
                        description='Write, per image, NAME_feature_maps.png (T2T stages at strides 4 and 8 and chosen '
                                    'blocks, channels as a grid), NAME_attention.png (class-token attention per head), '
                                    'NAME_rollout.png (attention rollout over all blocks) and NAME_t2t_attention.png '
                                    '(T2T attention of a few query tokens; implied by the kernel for Performer '
                                    'models). Without IMAGE: scikit-image\'s astronaut, chelsea and coffee photos.')
    vz.add_argument('images', nargs='*', metavar='IMAGE')
    _add_model_flags(vz, checkpoint_required=False)
    vz.add_argument('--output', '-o', default='runs/visualize', metavar='DIR', help='default: runs/visualize')
    vz.add_argument('--blocks', type=_int_list, default=None, metavar='I,J,...',
                    help='blocks to show, counted from 0 (default: first, middle, last)')
    vz.add_argument('--channels', type=_positive_int, default=16, help='channels per feature map (default 16)')
    vz.set_defaults(func=_cmd_visualize)

    from ..tools.ablate import DATASET_DEFAULTS, DEFAULT_EPOCHS, DEFAULT_VARIANTS
    description, epilog = _ablate_help()
    ab = sub.add_parser('ablate', help="the paper's design study on a small data set: train variants, compare them",
                        description=description, epilog=epilog, formatter_class=_DefaultsAndLayoutHelp)
    ab.add_argument('--variants', type=_comma_list, default=','.join(DEFAULT_VARIANTS), metavar='A,B,...',
                    help='comma-separated variant names (listed below)')
    ab.add_argument('--dataset', default='fashion_mnist', choices=[*DATASET_DEFAULTS, 'wds', 'hfds'],
                    help='data set; image size, channels, normalisation and classes follow it (wds, hfds: those of '
                         'the data set convert-data wrote them from)')
    ab.add_argument('--data', metavar='DIR', default=None,
                    help='data set folder (default: data/fashion-mnist for fashion_mnist; needed for the others)')
    ab.add_argument('--recipe', metavar='RECIPE', default='fashion_mnist', help='training recipe every variant shares')
    ab.add_argument('--epochs', type=int, default=DEFAULT_EPOCHS, help='epochs per variant')
    ab.add_argument('--max-steps', type=int, default=None, help='optimizer steps per variant (a budget below --epochs)')
    ab.add_argument('--batch-size', type=int, default=None, help="global batch size (default: the recipe's: 64 for "
                    "fashion_mnist)")
    ab.add_argument('--seed', type=int, default=0, help='seed of every run (data order, augmentation, dropout)')
    ab.add_argument('--scale', default='small', choices=('small', 'paper'),
                    help='small: every idea at the common small scale (28-32 px); paper: the registered builders')
    ab.add_argument('--img-size', type=int, default=None, help="image size (default: the data set's)")
    ab.add_argument('--name', default=None, help='results go to OUTPUT/ablate-NAME (default: the data set name)')
    ab.add_argument('--output', metavar='DIR', default='runs', help='folder holding the ablate-NAME folder')
    ab.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                    help='training and measuring device')
    ab.add_argument('--throughput-batch', type=int, default=64, help='batch size of the images/s loop')
    ab.add_argument('--throughput-seconds', type=float, default=3.0, help='duration of the images/s loop')
    ab.add_argument('--set', type=_key_value, action='append', metavar='KEY=VALUE',
                    help='any other recipe key, repeatable, e.g. --set lr=1e-3 --set workers=2 '
                         '(t2tvit train --help lists the keys)')
    ab.set_defaults(func=_cmd_ablate)

    _add_convert_data_parser(sub)

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
                       help='also time a copy of each T2T-ViT without these CPU kernels, side by side: '
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
    bench.add_argument('--data-loading', action='store_true',
                       help='instead: images/s one data-loader worker reads, decodes and augments (ImageNet recipe, '
                            '224 px) from an image folder, WebDataset shards and a Hugging Face dataset of synthetic '
                            'JPEGs, and the workers per device that --models need (their training images/s timed on '
                            '--device with --batch-size, or given by --train-rate)')
    bench.add_argument('--loading-images', type=_positive_int, default=256, metavar='N',
                       help='--data-loading: synthetic JPEGs per format (default 256)')
    bench.add_argument('--train-rate', metavar='MODEL=IMG/S,...',
                       help='--data-loading: training images/s per model instead of timing them, '
                            'e.g. t2t_vit_7=3000,t2t_vit_14=1200')
    bench.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..data import DataError
    from ..engine.checkpointing import CheckpointSaveError
    from ..engine.config import ConfigError
    from ..models import CheckpointError
    from ..cpu_kernels import CPUKernelError
    from ..tools.export import ExportError
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, CheckpointSaveError, ExportError, CPUKernelError,
            FileNotFoundError) as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error('stopped at once by a second Ctrl-C; rerun the same command to resume from last.pth',
                      128 + signal.SIGINT)


if __name__ == '__main__':
    sys.exit(main())
