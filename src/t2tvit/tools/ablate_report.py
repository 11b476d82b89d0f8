"""The design study's report: statistics of its runs, the verdict on each claim of the paper, and the files.

`build_record` turns the runs into what `results.json` holds:
- `variants`: per variant at the largest training-set size, every run's top-1 with n, mean, std and the 95%
  t-interval, params, MACs and images/s, and its paired difference against the baseline (same seeds);
- `claims`: one comparison of the paper's Tables 6-7 each, with the paper's difference (from `tools.paper`), ours
  with its interval and width, and a `verdict` computed by `tools.stats.verdict`;
- `size_sweep`: top-1 against training-set size per variant that ran at several sizes.
`write_tables` writes results.json, results.md and three figures: results.png (top-1 with intervals, the
differences against the baseline, MACs, images/s), results_macs.png (top-1 against MACs) and results_sizes.png
(top-1 against training-set size).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..engine.checkpointing import atomic_write
from .ablate_build import idea_of
from .paper import CLAIMS, DESIGN_STUDY
from .stats import CONFIDENCE, EQUAL_MARGIN, paired_difference, summarize, verdict

__all__ = ['host_name', 'build_record', 'write_tables', 'format_markdown', 'findings_table', 'study_table', 'sweep_table']


def _top1s(runs: Sequence[Any], variant: str, size: Any) -> Dict[int, float]:
    return {r.seed: r.top1 for r in runs if r.variant == variant and r.train_images == size and r.top1 is not None}


def _claims(variants: Dict[str, Dict[str, Any]], baseline: str) -> List[Dict[str, Any]]:
    claims = []
    for claim in CLAIMS:
        if claim.baseline != baseline or claim.variant not in variants or baseline not in variants:
            continue
        ours = variants[claim.variant]['difference']
        judged = verdict(claim.paper_difference, ours['ci95'], ours['n'])
        claims.append(dict(
            claim=claim.claim, variant=claim.variant, baseline=baseline,
            paper_baseline_top1=DESIGN_STUDY[baseline].top1, paper_variant_top1=DESIGN_STUDY[claim.variant].top1,
            paper_difference=claim.paper_difference, difference=ours['mean'], ci95=ours['ci95'],
            ci95_width=ours['ci95_width'], n=ours['n'], **judged))
    return claims


def build_record(setup: Dict[str, Any], runs: Sequence[Any], measured: Dict[str, Dict[str, Any]],
                 variants: Sequence[str]) -> Dict[str, Any]:
    """results.json: the set-up, every run, per-variant statistics, the claims and the size sweep."""
    size = setup['train_images'][-1]
    baseline = setup['baseline'] if setup['baseline'] in variants else variants[0]
    base = _top1s(runs, baseline, size)
    rows: Dict[str, Dict[str, Any]] = {}
    for variant in variants:
        top1 = _top1s(runs, variant, size)
        if not top1 and variant not in measured:
            continue
        paper = DESIGN_STUDY.get(variant)
        rows[variant] = dict(
            variant=variant, idea=idea_of(variant), train_images=size, model_kwargs=setup['model_kwargs'][variant],
            seeds=sorted(top1), top1=[top1[s] for s in sorted(top1)], **summarize(list(top1.values())),
            **measured.get(variant, {}), paper=asdict(paper) if paper else None,
            difference=dict(baseline=baseline, **paired_difference(top1, base)),
            statuses=sorted({r.status for r in runs if r.variant == variant}))
    sweep = []
    for variant in variants:
        sizes = [s for s in setup['train_images'] if _top1s(runs, variant, s)]
        if len(sizes) > 1:
            for s in sizes:
                top1 = _top1s(runs, variant, s)
                # paired with the baseline at the same size and seed: how the gap moves with the data
                sweep.append(dict(variant=variant, train_images=s, seeds=sorted(top1),
                                  top1=[top1[k] for k in sorted(top1)], **summarize(list(top1.values())),
                                  difference=dict(baseline=baseline,
                                                  **paired_difference(top1, _top1s(runs, baseline, s)))))
    return dict(setup=dict(setup, confidence=CONFIDENCE, equal_margin=EQUAL_MARGIN), variants=list(rows.values()),
                claims=_claims(rows, baseline), size_sweep=sweep, runs=[asdict(r) for r in runs])


def host_name() -> str:
    """The CPU's model name (what `lscpu` prints), or the platform's processor string."""
    import platform
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- tables ----------------------------------------------------------------------------------------------------------

def _f(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def _interval(ci: Optional[Sequence[float]], digits: int = 2) -> str:
    return '-' if ci is None else f'[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]'


def _signed(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None else f'{value:+.{digits}f}'


def study_table(record: Dict[str, Any]) -> str:
    """One row per variant: top-1 mean, std and interval, the paired difference against the baseline, the cost."""
    lines = ['| variant | idea | n | top-1 mean (%) | std | 95% interval | vs baseline (points) | 95% interval '
             '| params (M) | MACs (M) | images/s |',
             '|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|']
    for v in record['variants']:
        d = v['difference']
        same = v['variant'] == d['baseline']
        lines.append(
            f"| `{v['variant']}` | {v['idea']} | {v['n']} | {_f(v['mean'])} | {_f(v['std'])} | {_interval(v['ci95'])} "
            f"| {'baseline' if same else _signed(d['mean'])} | {'-' if same else _interval(d['ci95'])} "
            f"| {v.get('params_total', 0) / 1e6:.3f} | {v.get('macs', 0) / 1e6:.1f} | {v.get('images_per_s', 0):.0f} |")
    return '\n'.join(lines)


def findings_table(record: Dict[str, Any]) -> str:
    """One row per claim: the paper's numbers, ours with the interval and its width, the verdict and why."""
    lines = ['| claim (paper, Tables 6-7) | variant | paper: variant - baseline (points) | ours (points) '
             '| 95% interval | width | n | verdict |',
             '|---|---|---:|---:|---|---:|---:|---|']
    for c in record['claims']:
        lines.append(
            f"| {c['claim']} | `{c['variant']}` | {c['paper_variant_top1']:.1f} - {c['paper_baseline_top1']:.1f} = "
            f"{c['paper_difference']:+.1f} | {_signed(c['difference'])} | {_interval(c['ci95'])} "
            f"| {_f(c['ci95_width'])} | {c['n']} | **{c['verdict']}**: {c['reason']} |")
    return '\n'.join(lines)


def sweep_table(record: Dict[str, Any]) -> str:
    """Top-1 against training-set size, one row per (variant, size), with the paired difference against the
    baseline at that size."""
    lines = ['| variant | training images | n | top-1 mean (%) | std | 95% interval | vs baseline (points) '
             '| 95% interval |', '|---|---:|---:|---:|---:|---|---:|---|']
    for row in record['size_sweep']:
        d = row.get('difference') or {}
        same = row['variant'] == d.get('baseline') or not d.get('n')
        lines.append(f"| `{row['variant']}` | {row['train_images']} | {row['n']} | {_f(row['mean'])} "
                     f"| {_f(row['std'])} | {_interval(row['ci95'])} | {'-' if same else _signed(d['mean'])} "
                     f"| {'-' if same else _interval(d['ci95'])} |")
    return '\n'.join(lines)


def format_markdown(record: Dict[str, Any]) -> str:
    setup = record['setup']
    text = [
        f"# T2T-ViT design study on {setup['dataset']}",
        '',
        f"Every run: recipe `{setup['recipe']}`, {setup['max_steps']} optimizer steps of {setup['batch_size']} images, "
        f"{setup['schedule']}; seeds {', '.join(map(str, setup['seeds']))}; training-set sizes "
        f"{', '.join(map(str, setup['train_images']))} (seeded subsets of {setup['train_split_images']}). Top-1: the "
        f"final weights on the whole validation (test) split; nothing is selected on it. Intervals: two-sided "
        f"{setup['confidence']:.0%} Student t. Differences are paired by seed against `{setup['baseline']}`. "
        f"{setup['scale']}-scale builds, {setup['img_size']} px, {setup['in_chans']} channel(s). images/s: inference, "
        f"batch {setup['throughput_batch']}, {setup['device']}, {setup['torch_threads']} thread(s). "
        f"{setup['macs_convention']} Host: {setup['host']}; date {setup['date']}.",
        '', study_table(record), '', '## The paper\'s claims', '', findings_table(record)]
    if record['size_sweep']:
        text += ['', '## Top-1 against training-set size', '', sweep_table(record)]
    return '\n'.join(text) + '\n'


def write_tables(folder: Path, record: Dict[str, Any], figures: bool = True) -> List[Path]:
    """results.json, results.md and (with `figures`) the figures in `folder`, each written whole or not at all."""
    from .ablate_plots import plot_macs, plot_sizes, plot_study
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (('results.json', json.dumps(record, indent=1)), ('results.md', format_markdown(record))):
        atomic_write(folder / name, lambda f, text=text: f.write(text.encode()), 'study table')
        files.append(folder / name)
    if not figures:
        return files
    files.append(plot_study(record, folder / 'results.png'))
    files.append(plot_macs(record, folder / 'results_macs.png'))
    if record['size_sweep']:
        files.append(plot_sizes(record, folder / 'results_sizes.png'))
    return files
