"""`t2tvit` command line entry point."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    from ..tools.info import format_fixture_table, format_variant_table, variant_rows, verify_official_fixtures
    print(format_variant_table(variant_rows(with_tags=not args.no_tags)))
    if args.fixtures is not None:
        official = Path(args.fixtures)
        if not (official / 'tiny_configs.json').is_file():
            print(f'error: {official} holds no tiny_configs.json; point --fixtures at the official fixtures folder',
                  file=sys.stderr)
            return 2
        rows = verify_official_fixtures(official)
        print()
        print(format_fixture_table(rows, tolerance=args.tolerance))
        worst = max(max(r.pre_logits_max_abs_diff, r.logits_max_abs_diff) for r in rows)
        if worst > args.tolerance:
            print(f'error: outputs differ from the official ones by {worst:.2e} > {args.tolerance:.0e}',
                  file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='t2tvit', description='Tokens-to-Token ViT: models, checks and tools.')
    sub = parser.add_subparsers(dest='command', required=True)

    info = sub.add_parser('info', help='list every variant with its parameter counts; optionally check fixtures',
                          description='Print every registered variant with parameter counts beside the paper, '
                                      'and optionally compare outputs with official reference checkpoints.')
    info.add_argument('--fixtures', metavar='DIR', default=None,
                      help='folder with tiny_configs.json and official *.pth.tar/_io.pt files to check against')
    info.add_argument('--tolerance', type=float, default=1e-5, help='largest allowed abs difference (default 1e-5)')
    info.add_argument('--no-tags', action='store_true', help='list only the base names, not the .in1k_384 tags')
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
