"""The design study's figures, from the record `ablate_report.build_record` makes.

Top-1 is drawn as points with their 95% intervals, not as bars: a bar's length claims a zero the axis does not
show, while points on an axis fitted to the intervals show every difference at its true size. Each runs' own
top-1 is drawn too, so n = 1 (no interval) is visible as such. A model far from the rest (more than
`OUTLIER_WINDOW` points from its panel's median) is marked at the edge with its value instead of stretching the axis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

__all__ = ['plot_study', 'plot_macs', 'plot_sizes']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _errors(rows: Sequence[Dict[str, Any]], key: str = 'ci95') -> List[List[float]]:
    low = [r['mean'] - r[key][0] if r.get(key) else 0.0 for r in rows]
    high = [r[key][1] - r['mean'] if r.get(key) else 0.0 for r in rows]
    return [low, high]


# a point this many points (top-1 or difference) from the median of its panel is drawn at the panel's edge with its
# value: one far-off model (a CNN that cannot work at 28 px) would otherwise squeeze every other difference flat
OUTLIER_WINDOW = 10.0


def _fit_axis(ax, means: Sequence[float], intervals: Sequence[Any], window: float = OUTLIER_WINDOW) -> None:
    """Fit the x axis to the points within `window` of the median; mark the others at the edge with their value."""
    ordered = sorted(means)
    center = ordered[len(ordered) // 2]
    inside = [abs(m - center) <= window for m in means]
    if all(inside):
        return
    spans = [(ci or (m, m)) for m, ci, keep in zip(means, intervals, inside) if keep]
    low, high = min(s[0] for s in spans), max(s[1] for s in spans)
    pad = max(0.1 * (high - low), 0.5)
    ax.set_xlim(low - 2 * pad, high + 2 * pad)
    for i, (m, keep) in enumerate(zip(means, inside)):
        if not keep:
            left = m < center
            edge = low - 1.5 * pad if left else high + 1.5 * pad
            ax.plot([edge], [i], '<' if left else '>', color='tab:red')
            ax.annotate(f'{m:.1f} (off axis)', (edge, i), xytext=(4 if left else -4, 6), textcoords='offset points',
                        ha='left' if left else 'right', fontsize=8, color='tab:red')


def _save(fig, path: Path) -> Path:
    temporary = path.with_name(f'.{path.stem}.tmp.png')
    fig.savefig(temporary, dpi=110)
    _pyplot().close(fig)
    temporary.replace(path)
    return path


def plot_study(record: Dict[str, Any], path: Path) -> Path:
    """Top-1 per variant, the paired difference against the baseline (the paper's as a cross), MACs, images/s."""
    plt = _pyplot()
    rows = [r for r in record['variants'] if r['mean'] is not None]
    setup = record['setup']
    names = [r['variant'] for r in rows]
    y = list(range(len(rows)))
    fig, axes = plt.subplots(1, 4, figsize=(19, 1.4 + 0.42 * len(rows)), sharey=True,
                             gridspec_kw={'width_ratios': [3, 3, 1.4, 1.4]})
    ax = axes[0]
    ax.errorbar([r['mean'] for r in rows], y, xerr=_errors(rows), fmt='o', color='tab:blue', capsize=3,
                label=f"mean, {setup['confidence']:.0%} t-interval")
    for i, r in enumerate(rows):
        ax.plot(r['top1'], [i] * len(r['top1']), 'x', color='tab:gray', markersize=4)
    _fit_axis(ax, [r['mean'] for r in rows], [r.get('ci95') for r in rows])
    ax.set_title(f"top-1 on {setup['dataset']} (%), n = {max((r['n'] for r in rows), default=0)} seeds", fontsize=10)
    ax.legend(fontsize=8, loc='lower left')
    ax.grid(axis='x', alpha=0.3)
    ax = axes[1]
    diffs = [r['difference'] for r in rows]
    ax.errorbar([d['mean'] if d['mean'] is not None else 0.0 for d in diffs], y, xerr=_errors(diffs), fmt='o',
                color='tab:purple', capsize=3, label='ours, paired by seed')
    base = next((r for r in record['variants'] if diffs and r['variant'] == diffs[0]['baseline']), None)
    paper = [(i, r['paper']['top1'] - base['paper']['top1'])
             for i, r in enumerate(rows) if r.get('paper') and base and base.get('paper')]
    if paper:
        ax.plot([p[1] for p in paper], [p[0] for p in paper], 'x', color='tab:red', label='paper (ImageNet)')
    _fit_axis(ax, [d['mean'] if d['mean'] is not None else 0.0 for d in diffs], [d.get('ci95') for d in diffs])
    ax.axvline(0, color='black', linewidth=0.8)
    ax.set_title(f"top-1 minus {diffs[0]['baseline'] if diffs else 'baseline'} (points)", fontsize=10)
    ax.legend(fontsize=8, loc='lower left')
    ax.grid(axis='x', alpha=0.3)
    for ax, key, title, color in ((axes[2], 'macs', 'MACs per image (M)', 'tab:orange'),
                                  (axes[3], 'images_per_s', f"images/s ({setup['device']})", 'tab:green')):
        values = [r.get(key, 0) / (1e6 if key == 'macs' else 1) for r in rows]
        ax.barh(y, values, color=color)  # counts and rates start at zero: a bar is honest here
        ax.set_title(title, fontsize=10)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    fig.suptitle(f"T2T-ViT design study: {setup['dataset']}, {setup['max_steps']} steps per run, "
                 f"{setup['train_images'][-1]} training images")
    fig.tight_layout()
    return _save(fig, path)


def plot_macs(record: Dict[str, Any], path: Path) -> Path:
    """Top-1 (mean and interval) against MACs per image, one labelled point per variant."""
    plt = _pyplot()
    rows = [r for r in record['variants'] if r['mean'] is not None and r.get('macs')]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    x = [r['macs'] / 1e6 for r in rows]
    ax.errorbar(x, [r['mean'] for r in rows], yerr=_errors(rows), fmt='o', capsize=3)
    for xi, r in zip(x, rows):
        ax.annotate(r['variant'], (xi, r['mean']), xytext=(4, 4), textcoords='offset points', fontsize=8)
    ax.set_xscale('log')
    ax.set_xlabel('MACs per image (M, log scale)')
    ax.set_ylabel(f"top-1 (%), mean and {record['setup']['confidence']:.0%} t-interval")
    ax.set_title(f"top-1 against compute: {record['setup']['dataset']}, {record['setup']['max_steps']} steps per run")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_sizes(record: Dict[str, Any], path: Path) -> Path:
    """Top-1 against training-set size (log axis), one line with intervals per variant."""
    plt = _pyplot()
    setup = record['setup']
    full = setup['train_split_images']
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sizes = []
    for k, variant in enumerate(dict.fromkeys(r['variant'] for r in record['size_sweep'])):
        rows = [r for r in record['size_sweep'] if r['variant'] == variant]
        x = [full if r['train_images'] == 'all' else r['train_images'] for r in rows]
        sizes += x
        dodge = 1.0 + 0.04 * (k - 1)  # side by side, so the intervals do not hide each other
        ax.errorbar([v * dodge for v in x], [r['mean'] for r in rows], yerr=_errors(rows), fmt='o-', capsize=3,
                    label=variant)
    ax.set_xscale('log')
    ax.set_xticks(sorted(set(sizes)), [str(v) for v in sorted(set(sizes))])
    ax.minorticks_off()
    ax.set_xlabel(f"training images (log scale; {full} = all; points of a size drawn side by side)")
    ax.set_ylabel(f"top-1 (%), mean and {setup['confidence']:.0%} t-interval")
    ax.set_title(f"top-1 against training-set size, {setup['max_steps']} steps per run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
