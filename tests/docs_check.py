"""Keep README.md and docs/*.md true: links and anchors resolve, marked console examples still print what they
show, and tables of measured figures are the committed benchmark files' own numbers.

    python tests/docs_check.py               # links, fast examples and tables (what `make test` checks)
    python tests/docs_check.py --demo RUN    # also the examples that read the demo's checkpoint (`make docs-check`)
    python tests/docs_check.py --demo RUN --write   # a new demo model: write what they print into the documents

A console example is checked when the line before its fence is a marker:

    <!-- check: fast -->             run in `make test` (seconds, no data)
    <!-- check: python -->           a Python block that must run without error, in `make test`
    <!-- check: demo rtol=0.02 -->  needs `make demo`'s run folder and Fashion-MNIST samples (`make docs-check`)

Each `$ COMMAND` runs in a scratch folder (with `examples/`, `runs/` and `samples/` linked in); `t2tvit` and
`python` mean this interpreter. Its output must match the lines under it: text exactly (trailing spaces aside),
each number within `atol + rtol * |shown|` (defaults 0: exact as printed), and a line `...` stands for any lines.

A demo example's marker also names the model that printed it, `model=ID` (`demo_model(RUN).id`: a hash of the
checkpoint's evaluated weights). Another demo model (another seed, host or precision) learns other weights and
prints other probabilities, and sometimes another order of classes; with it the example is checked for form only:
the same lines, each with numbers and class names of its own in the places the document shows them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
DEMO_RUN = 'runs/fashion_mnist-demo'
NUMBER = re.compile(r'[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?')
MARKER = re.compile(r'<!--\s*check:\s*(\w+)((?:\s+\w+=[\w.+-]+)*)\s*-->')
LINK = re.compile(r'!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)')


def markdown_files() -> List[Path]:
    return [REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md')) + [REPO / 'benchmarks' / 'README.md']


def _strip_code(text: str) -> str:
    """The text with fenced blocks and inline code blanked out (links inside them are not links)."""
    text = re.sub(r'```.*?```', '', text, flags=re.S)
    return re.sub(r'`[^`\n]*`', '', text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'`|\*\*|\[|\]\([^)]*\)', '', heading.strip().lower())
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(path: Path) -> set:
    seen: Dict[str, int] = {}
    out = set()
    for line in re.sub(r'```.*?```', '', path.read_text(), flags=re.S).splitlines():
        m = re.match(r'#{1,6}\s+(.*)', line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f'{base}-{n}')
            seen[base] = n + 1
    return out


def broken_links(path: Path) -> List[str]:
    """Relative links of `path` that point nowhere, and #anchors that no heading makes."""
    problems = []
    for target in LINK.findall(_strip_code(path.read_text())):
        if re.match(r'[a-z]+:', target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition('#')
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f'{path.relative_to(REPO)}: {target} (no such file)')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            problems.append(f'{path.relative_to(REPO)}: {target} (no heading makes #{anchor})')
    return problems


# --- console examples ----------------------------------------------------------------------------------------

@dataclass
class Example:
    path: Path
    line: int
    kind: str
    rtol: float = 0.0
    atol: float = 0.0
    model: str = ''  # demo examples: the demo model whose output the document shows (`DemoModel.id`)
    steps: List[Tuple[str, List[str]]] = field(default_factory=list)  # (command, expected output lines)

    @property
    def where(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f'{path}:{self.line}'


def examples(path: Path) -> List[Example]:
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = MARKER.fullmatch(line.strip())
        if not m or i + 1 >= len(lines) or not lines[i + 1].startswith('```'):
            continue
        options = dict(opt.split('=') for opt in m.group(2).split())
        example = Example(path, i + 2, m.group(1), float(options.get('rtol', 0)), float(options.get('atol', 0)),
                          options.get('model', ''))
        code = []
        for body in lines[i + 2:]:
            if body.startswith('```'):
                break
            if example.kind == 'python':
                code.append(body)
            elif body.startswith('$ '):
                example.steps.append((body[2:], []))
            elif example.steps:
                example.steps[-1][1].append(body)
        if example.kind == 'python':  # a Python block: it must run without error
            example.steps.append(('python -c ' + shlex.quote('\n'.join(code)), ['...']))
        found.append(example)
    return found


def _numbers_match(shown: str, got: str, rtol: float, atol: float) -> bool:
    a, b = float(shown.replace(',', '')), float(got.replace(',', ''))
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or abs(a - b) <= atol + rtol * abs(a)


def _form(line: str, labels: Sequence[str]) -> str:
    """`line` with each class name of `labels` as `<label>` (longest first), each number as `#` and each run of
    spaces as one (right-aligned columns widen with a number's digits: `   8.17%` and `  24.70%`)."""
    for label in sorted(labels, key=len, reverse=True):
        line = line.replace(label, '<label>')
    return re.sub(' +', ' ', NUMBER.sub('#', line))


def line_matches(shown: str, got: str, rtol: float, atol: float, labels: Optional[Sequence[str]] = None) -> bool:
    """Whether a printed line is the shown one; with `labels`, for form only: any numbers, any of these class names."""
    shown, got = shown.rstrip(), got.rstrip()
    if labels is not None:
        return _form(shown, labels) == _form(got, labels)
    if NUMBER.sub('#', shown) != NUMBER.sub('#', got):
        return False
    return all(_numbers_match(s, g, rtol, atol) for s, g in zip(NUMBER.findall(shown), NUMBER.findall(got)))


def output_matches(shown: Sequence[str], got: Sequence[str], rtol: float, atol: float,
                   labels: Optional[Sequence[str]] = None) -> bool:
    """`shown` (with `...` lines standing for any lines) against the lines printed (`labels`: `line_matches`)."""
    if not shown:
        return not got
    if shown[0].strip() == '...':
        return any(output_matches(shown[1:], got[k:], rtol, atol, labels) for k in range(len(got) + 1))
    return (bool(got) and line_matches(shown[0], got[0], rtol, atol, labels)
            and output_matches(shown[1:], got[1:], rtol, atol, labels))


@dataclass(frozen=True)
class DemoModel:
    """The demo model a run folder holds: `id` names its evaluated weights, `classes` its class names."""
    id: str
    classes: Tuple[str, ...]


def demo_model(run: Path) -> DemoModel:
    """The model of `run`/best.pth: a hash of the weights `t2tvit predict` loads from it (names, dtypes, shapes,
    bytes), so two checkpoints share an id only when they hold the same weights."""
    import hashlib

    import torch
    from t2tvit.models.checkpoint import extract_state_dict, read_checkpoint

    checkpoint = read_checkpoint(run / 'best.pth')
    digest = hashlib.sha256()
    for name, tensor in sorted(extract_state_dict(checkpoint).items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f'{name} {tensor.dtype} {tuple(tensor.shape)}\n'.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return DemoModel(digest.hexdigest()[:12], tuple(checkpoint.get('classes') or ()))


def _command(text: str) -> List[str]:
    words = shlex.split(text)
    if words[0] == 't2tvit':
        return [sys.executable, '-m', 't2tvit'] + words[1:]
    if words[0] == 'python':
        return [sys.executable] + words[1:]
    return words


def scratch_folder(demo_run: Optional[Path], data: Optional[Path]) -> Path:
    """A folder to run examples in: examples/ linked in, runs/fashion_mnist-demo -> the demo run, samples/."""
    work = Path(tempfile.mkdtemp(prefix='t2tvit-docs-'))
    (work / 'examples').symlink_to(REPO / 'examples')
    if demo_run is not None:
        (work / 'runs').mkdir()
        (work / DEMO_RUN).symlink_to(demo_run.resolve())
    if data is not None:
        subprocess.run([sys.executable, str(REPO / 'examples' / 'make_samples.py'), str(data), str(work / 'samples')],
                       check=True, capture_output=True, env=_env())
    return work


def _env() -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / 'src'), os.environ.get('PYTHONPATH')])),
               COLUMNS='120')
    env.pop('PYTEST_XDIST_WORKER', None)
    return env


def _noise(line: str) -> bool:
    """Library log lines that are no part of an example's output (onnxruntime's coloured warnings, Python's)."""
    return line.startswith(('Warning:', '  warnings.warn')) or '[W:onnxruntime:' in line or '\x1b[' in line


def form_only(example: Example, demo: Optional[DemoModel]) -> Optional[str]:
    """Why `example` is checked for form only when run with `demo` (a demo example shown with another model), or
    None when it is compared number by number."""
    if example.kind != 'demo' or demo is None or example.model == demo.id:
        return None
    return f'shown with demo model {example.model or "(unnamed)"}, run with {demo.id}: checked for form only'


def run_example(example: Example, work: Path, printed: Optional[List[List[str]]] = None,
                demo: Optional[DemoModel] = None) -> List[str]:
    """Problems found (empty when every step printed what the document shows); `printed` collects the output.
    `demo`: the demo model the examples run with; a demo example shown with another model is checked for form."""
    problems = []
    status = 0
    why_form = form_only(example, demo)
    labels = demo.classes if why_form else None
    for command, shown in example.steps:
        if command.strip() == 'echo $?':
            got = [str(status)]
        else:
            proc = subprocess.run(_command(command), cwd=work, env=_env(), capture_output=True, text=True,
                                  timeout=600)
            status = proc.returncode
            got = [line for line in (proc.stdout + proc.stderr).splitlines() if not _noise(line)]
        if printed is not None:
            printed.append(got)
        if example.kind == 'python' and status != 0:
            problems.append(f'{example.where}: the Python example failed:\n' + '\n'.join(got[-15:]))
        elif not output_matches(shown, got, example.rtol, example.atol, labels):
            what = f' ({why_form})' if why_form else ''
            problems.append(f'{example.where}: `{command}` printed\n' + '\n'.join(got) +
                            f'\n--- the document shows{what} ---\n' + '\n'.join(shown))
    return problems


# --- tables from committed data ------------------------------------------------------------------------------

INT8_BENCHMARK = 'xeon-amx-int8-openvino-2026-12-06-final.json'


def load_benchmark(name: str) -> dict:
    return json.loads((REPO / 'benchmarks' / name).read_text())


def speed_table(result: dict) -> str:
    """The per-run throughput table of a `t2tvit benchmark` JSON file."""
    rows = ['| run | model | GMACs (b) | images/s median (min..max) | x deit_small | MFU | MFU torch.mm | peak MiB |',
            '|---|---|---:|---:|---:|---:|---:|---:|']
    for run in result['runs']:
        for i, m in enumerate(run['models']):
            speed = f"{m['images_per_s']:.1f} ({m['images_per_s_min']:.1f}..{m['images_per_s_max']:.1f})"
            if 'x_fp32' in m:
                speed += f", {m['x_fp32']:.2f}x fp32"
            torch_mm = (m.get('mfu_by_library') or {}).get('torch.mm')
            rows.append(f"| {run['run'] if i == 0 else ''} | `{m['label']}` | {m['macs_all'] / 1e9:.2f} | {speed} | "
                        f"{m['x_reference']:.2f} | {m['mfu']:.1%} | {'-' if torch_mm is None else f'{torch_mm:.1%}'} | "
                        f"{m['peak_bytes'] / 2 ** 20:,.0f} |")
    return '\n'.join(rows)


def complexity_table(result: dict) -> str:
    """Parameters and MACs of every variant at 224 and 384 px, as the benchmark file recorded them."""
    rows = ['| model | px | params: total / trainable | paper | MACs (a) layers | MACs (b) all | paper | (b) vs paper |',
            '|---|---:|---:|---:|---:|---:|---:|---:|']
    for v in result['variants']:
        paper_p = f"{v['paper_params_m']} M" if v.get('paper_params_m') else ''
        paper_m = f"{v['paper_macs_g']} G" if v.get('paper_macs_g') else ''
        diff = f"{v['macs_diff']:+.1%}" if v.get('macs_diff') is not None else ''
        rows.append(f"| `{v['name']}` | {v['img_size']} | {v['params_total']:,} / {v['params_trainable']:,} | {paper_p} | "
                    f"{v['macs_layers'] / 1e9:.2f} G | {v['macs_all'] / 1e9:.2f} G | {paper_m} | {diff} |")
    return '\n'.join(rows)


def demo_table(record: dict) -> str:
    """Every recorded demo run of benchmarks/demo-fashion_mnist.json."""
    def pct(value):
        return '-' if value is None else f'{value:.2f}%'

    def minutes(value):
        return '-' if value is None else f'{value:.1f}'

    rows = ['| date | recipe | `best.pth` chosen on | seed | held-out top-1 | test top-1 | training min | wall min | '
            'machine | note |', '|---|---|---|---:|---:|---:|---:|---:|---|---|']
    for run in record['runs']:
        chosen = '5,000 held-out training images' if run['selection'] == 'held-out' else 'the test images'
        rows.append(f"| {run['date']} | {run['recipe']} | {chosen} | {run['seed']} | {pct(run.get('heldout_top1'))} | "
                    f"**{pct(run['test_top1'])}** | {minutes(run.get('train_minutes'))} | "
                    f"{minutes(run.get('wall_minutes'))} | {run.get('machine', '-')} | {run.get('note', '')} |")
    return '\n'.join(rows)


def _kept(run: dict) -> str:
    if not run.get('kept'):
        return 'no'
    return f"yes, {run['kept_note']}" if run.get('kept_note') else 'yes'


def recipe_search_table(record: dict) -> str:
    """The demo recipe's search: each candidate trained once and judged on the held-out images only."""
    rows = ['| date | candidate | seed | held-out top-1, last epoch | best epoch | threads | training min | kept |',
            '|---|---|---:|---:|---:|---:|---:|---|']
    for run in record['recipe_search']:
        rows.append(f"| {run['date']} | {run['candidate']} | {run['seed']} | {run['heldout_top1']:.2f}% | "
                    f"{run['best_epoch']} ({run['best_heldout_top1']:.2f}%) | {run['threads']} | "
                    f"{run['train_minutes']:.1f} | {_kept(run)} |")
    return '\n'.join(rows)


def ablation_table(record: dict) -> str:
    rows = ['| variant | idea | params (M) | MACs (M) | images/s | top-1 (%) | paper model | paper top-1 (%) |',
            '|---|---|---:|---:|---:|---:|---|---:|']
    for r in record['results']:
        rows.append(f"| `{r['variant']}` | {r['idea']} | {r['params_m']:.3f} | {r['macs_m']:.1f} | {r['images_per_s']:.0f} | "
                    f"{r['top1']:.2f} | {r['paper_model']} | {r['paper_top1']} |")
    return '\n'.join(rows)


def study_table(record: dict) -> str:
    from t2tvit.tools.ablate_report import study_table as table
    return table(record)


def findings_table(record: dict) -> str:
    from t2tvit.tools.ablate_report import findings_table as table
    return table(record)


def size_sweep_table(record: dict) -> str:
    from t2tvit.tools.ablate_report import sweep_table as table
    return table(record)


def compare_table(record: dict) -> str:
    from t2tvit.tools.compare import invalid_table
    return invalid_table(record)


def models_table(_: object = None) -> str:
    """The README's models table: every tag `t2tvit info` prints, its parameters and MACs recomputed from the code,
    and, for the tags with released weights (`RELEASES`, what `pretrained=True` downloads), their file and the
    publisher's top-1."""
    from t2tvit.models.t2t_vit import RELEASES
    from t2tvit.tools.complexity import model_complexity
    from t2tvit.tools.info import variant_rows
    from t2tvit.tools.paper import DESIGN_STUDY

    rows = ['| model | tag | px | params | GMACs | top-1 (%) | weights (`pretrained=True`) |',
            '|---|---|---:|---:|---:|---:|---|']
    for v in variant_rows():
        name, _, tag = v.name.partition('.')
        c = model_complexity(v.name)
        release = RELEASES.get(v.name)
        if release:
            data = '' if release['dataset'] == 'ImageNet-1k' else f" {release['dataset']}"
            top1 = f"{release['top1']}{data}"
            source = 'mmpretrain' if 'openmmlab' in release['url'] else 'official'
            weights = f"{source} `{release['file']}`"
        elif name in DESIGN_STUDY and tag in ('', 'in1k'):
            top1, weights = f'{DESIGN_STUDY[name].top1} (paper)', '-'
        else:
            top1, weights = '-', '-'
        macs = f'{c.macs_all / 1e9:.2f}' if c.macs_all >= 1e8 else f'{c.macs_all / 1e9:.3f}'
        rows.append(f'| `{name}` | {tag or "-"} | {c.img_size} | {c.params_total / 1e6:.2f} M | {macs} | {top1} | '
                    f'{weights} |')
    return '\n'.join(rows)


def _reference(run: dict) -> dict:
    """The run's reference model (DeiT-S), as timed without A/B changes."""
    return next(m for m in run['models'] if m['name'] == run['reference'] and not m['slow_paths'])


def _per_mac(model: dict, reference: dict) -> float:
    """Images/s over the reference's, scaled by the two models' MACs: the issue's per-MAC ratio."""
    return model['x_reference'] * model['macs_all'] / reference['macs_all']


def host_table(result: dict) -> str:
    """Per run of a `t2tvit benchmark` file: each model against the reference per image and per MAC, then the CPU
    kernels the host's plan chose (`environment.cpu_kernels`) and why."""
    rows = ['| run | model | images/s | x reference | x reference per MAC | MFU |', '|---|---|---:|---:|---:|---:|']
    for run in result['runs']:
        ref = _reference(run)
        for i, m in enumerate(run['models']):
            rows.append(f"| {run['run'] if i == 0 else ''} | `{m['label']}` | {m['images_per_s']:.2f} | "
                        f"{m['x_reference']:.2f} | {_per_mac(m, ref):.2f} | {m['mfu']:.1%} |")
    plan = result['environment']['cpu_kernels']
    rows += ['', f"CPU kernels, profile `{plan['profile']}` ({plan['profile_source']}; flags "
                 f"{', '.join(plan['cpu']['flags'])}):", '', '| kernel | on | why |', '|---|---|---|']
    rows += [f"| `{name}` | {'yes' if k['on'] else 'no'} | {k['reason']} |" for name, k in plan['kernels'].items()]
    return '\n'.join(rows)


# every all-four-mode run of the intel-amx plan as it shipped then: (files, the label of its T2T-ViT-14 row); a
# driver-script A/B's plan-as-shipped row is its `[-KERNEL]` copy
INTEL_PLAN_RUNS = [
    (['intel-xeon-amx-2026-12-06.json'], 't2t_vit_14'),
    (['intel-xeon-amx-2026-12-06-quiet.json'], 't2t_vit_14'),
    (['intel-xeon-amx-2026-12-06-packed-paged.json'], 't2t_vit_14'),
    (['intel-xeon-amx-2026-12-06-plan.json'], 't2t_vit_14'),
    (['intel-xeon-amx-2026-12-06-plan-2.json'], 't2t_vit_14'),
    (['intel-xeon-amx-2026-12-06-plan-3.json'], 't2t_vit_14'),
    (['intel-xeon-amx-2026-12-07-batch-chunks-ab.json', 'intel-xeon-amx-2026-12-07-batch-chunks-ab-train.json'],
     't2t_vit_14 [-batch_chunks]'),
    (['intel-xeon-amx-2026-12-07-plan-4.json'], 't2t_vit_14'),
    (['intel-xeon-amx-2026-12-07-plan-5.json'], 't2t_vit_14'),
]
MODES = ['infer:fp32:eager', 'infer:bf16:eager', 'train:fp32:eager', 'train:bf16:eager']
# the heap A/B on the AVX2-only AMD EPYC: its own table, and its kept arms' row of the per-host table
HEAP_AB = 'amd-epyc-avx2-2026-12-07-heap-ab.json'


def _plan_models(files: List[str], label: str) -> Dict[str, Tuple[dict, dict]]:
    """Per mode in the benchmark files `files`: (`label`'s row, the reference's row)."""
    runs = {run['run']: run for f in files for run in load_benchmark(f)['runs']}
    return {mode: (next(m for m in runs[mode]['models'] if m['label'] == label), _reference(runs[mode]))
            for mode in MODES if mode in runs}


def _plan_per_mac(files: List[str], label: str) -> Dict[str, float]:
    """Per mode, `label`'s per-MAC ratio against the reference in the benchmark files `files`."""
    return {mode: _per_mac(ours, ref) for mode, (ours, ref) in _plan_models(files, label).items()}


def plan_runs_table(_: None = None) -> str:
    """Per MAC against the reference (DeiT-S) in each mode, and bf16 MFU beside the reference's, for every run of
    `INTEL_PLAN_RUNS`: the targets' standing across runs, each figure from its file."""
    rows = ['| run (benchmarks/) | began | fp32 inference | bf16 inference | fp32 training | bf16 training | '
            'bf16 MFU, inference / training (DeiT-S\'s) |', '|---|---|---:|---:|---:|---:|---|']
    for files, label in INTEL_PLAN_RUNS:
        models = _plan_models(files, label)
        per_mac = {mode: _per_mac(ours, ref) for mode, (ours, ref) in models.items()}
        mfu = {mode: f"{ours['mfu']:.1%} ({ref['mfu']:.1%})" for mode, (ours, ref) in models.items()}
        began = load_benchmark(files[0])['environment']['date'].replace('T', ' ')[:16]
        name = ', '.join(f.removesuffix('.json').removeprefix('intel-xeon-amx-') for f in files)
        rows.append(f"| {name} | {began} | " + ' | '.join(f'{per_mac[m]:.2f}' for m in MODES) +
                    f" | {mfu['infer:bf16:eager']} / {mfu['train:bf16:eager']} |")
    return '\n'.join(rows)


# the AVX2-only AMD EPYC's fp32 runs of 21 rounds: a row of the per-host table with an interval
AVX2_ROUNDS = 'amd-epyc-avx2-2026-12-08.json'


def _per_mac_interval(ours: dict, reference: dict) -> str:
    """The per-MAC ratio of each round (both models' steps in that round), as the geometric mean over the rounds
    and its 95% t-interval (`t2tvit.tools.stats.summarize` of the log ratios)."""
    from t2tvit.tools.stats import summarize
    macs = ours['macs_all'] / reference['macs_all']
    s = summarize([math.log(ref / own * macs) for own, ref in zip(ours['times_s'], reference['times_s'])])
    low, high = (math.exp(v) for v in s['ci95'])
    return f"{math.exp(s['mean']):.2f} ({low:.2f}-{high:.2f})"


def hosts_table(_: None = None) -> str:
    """Per host, T2T-ViT-14 with its host's plan against DeiT-S per MAC in each eager mode: every run of the
    Intel plan as a range, the AVX2-only AMD EPYC's runs, and the AVX-512 AMD EPYC's kernel A/B of 2026-12-02 (an
    older format: images/s over DeiT-S, scaled here by the two models' MACs from that host's benchmark file)."""
    rows = ['| host (profile) | runs (benchmarks/) | fp32 inference | bf16 inference | fp32 training | '
            'bf16 training |', '|---|---|---:|---:|---:|---:|']
    complexity = load_benchmark('amd-epyc-2026-11-27.json')['complexity']
    macs = complexity['t2t_vit_14']['macs_all'] / complexity['deit_small_patch16_224']['macs_all']
    old = {r['run'] + ':eager': r['x_deit_small'] * macs
           for r in load_benchmark('amd-epyc-2026-12-02-cpu-kernels-ab.json')['results']
           if r['entry'] == 't2t_vit_14 | new main (use_cpu_kernels)'}
    intel = [_plan_per_mac(files, label) for files, label in INTEL_PLAN_RUNS]
    avx2 = _plan_per_mac(['amd-epyc-avx2-2026-12-07.json', 'amd-epyc-avx2-2026-12-07-train.json',
                          'amd-epyc-avx2-2026-12-07-train-bf16.json'], 't2t_vit_14')

    def cell(values: List[float], note: str = '') -> str:
        if not values:
            return 'not timed'
        low, high = min(values), max(values)
        return (f'{low:.2f}' if len(values) == 1 else f'{low:.2f}-{high:.2f}') + note

    rows.append('| AMD EPYC with AVX-512 (`amd-avx512`) | amd-epyc-2026-12-02-cpu-kernels-ab (7 rounds) | '
                + ' | '.join(cell([old[m]] if m in old else []) for m in MODES) + ' |')
    rows.append(f'| Intel Xeon with AMX (`intel-amx`) | the {len(intel)} runs above | '
                + ' | '.join(cell([r[m] for r in intel]) for m in MODES) + ' |')
    emulated = {mode: ' (bf16 emulated)' for mode in MODES if ':bf16:' in mode}
    rows.append('| AMD EPYC Zen 3, AVX2 only (`generic`) | amd-epyc-avx2-2026-12-07, -train, -train-bf16 (3 rounds) | '
                + ' | '.join(cell([avx2[m]] if m in avx2 else [], emulated.get(m, '')) for m in MODES) + ' |')
    kept_arms = [arm for arm in load_benchmark(HEAP_AB)['benchmark_runs'] if arm['kept']]
    kept = {m: [r['per_mac'] for arm in kept_arms for r in arm['runs'] if r['run'] == m] for m in MODES}
    reps = sorted({r['reps'] for arm in kept_arms for r in arm['runs']})
    rows.append(f'| the same, freed memory kept (since 2026-12-07) | {HEAP_AB[:-5]} ({len(kept_arms)} processes, '
                f'{reps[0]}-{reps[-1]} rounds) | ' + ' | '.join(cell(kept[m]) for m in MODES) + ' |')
    rounds = _plan_models([AVX2_ROUNDS], 't2t_vit_14')
    rows.append(f'| the same, one run of {len(rounds["infer:fp32:eager"][0]["times_s"])} rounds (2026-12-08) | '
                f'{AVX2_ROUNDS[:-5]} | ' + ' | '.join(_per_mac_interval(*rounds[m]) if m in rounds else 'not timed'
                                                   for m in MODES) + ' |')
    return '\n'.join(rows)


# the seeded design study behind docs/ablation.md's findings (`t2tvit ablate`, then `visualize --compare`)
STUDY = 'ablate-fashion_mnist-1000steps-2026-12-06.json'
# `t2tvit ablate` with no flags: the timed default
DEFAULT_STUDY = 'ablate-fashion_mnist-400steps-2026-12-06.json'


def int8_speed_table(result: dict) -> str:
    """fp32 and int8 latency in ONNX Runtime and OpenVINO from a `t2tvit benchmark --runs infer:int8` file."""
    q, env = result['int8'], result['environment']
    from t2tvit.tools.quantize import RUNTIME_NAMES as names
    version = q.get('openvino', 'not installed')
    openvino = f", OpenVINO {version.split('-')[0]}" if version != 'not installed' else ''
    rows = [f"{env['device'].split(',')[0]}, ONNX Runtime {q['onnxruntime']}{openvino}, "
            f"{q['session_options']['intra_op_num_threads']} threads, {q['img_size']} px, {env['date'][:10]}, "
            f"median of {q['reps']} rounds (load average {env['load_average'][0]:.1f} at the start)", '',
            '| model | runtime | batch | fp32 ms | int8 ms | fp32 images/s | int8 images/s | int8 / fp32 |',
            '|---|---|---:|---:|---:|---:|---:|---:|']
    for r in q['models']:
        rows.append(f"| `{r['name']}` | {names[r.get('runtime', 'onnxruntime')]} | {r['batch']} | "
                    f"{r['fp32']['latency_ms']:.1f} | {r['int8']['latency_ms']:.1f} | "
                    f"{r['fp32']['images_per_s']:.1f} | {r['int8']['images_per_s']:.1f} | "
                    f"**{r['int8_speedup']:.2f}x** |")
    return '\n'.join(rows)


def int8_accuracy_table(record: dict) -> str:
    """The demo model's int8 export against its fp32 ONNX graph on the test images."""
    rows = ['| date | CPU | checkpoint | runtime | calibration | test images | fp32 top-1 | int8 top-1 | drop | '
            'top-1 agreement |',
            '|---|---|---|---|---|---:|---:|---:|---:|---:|']
    from t2tvit.tools.quantize import RUNTIME_NAMES as names
    for r in record['runs']:
        q = r['int8']
        products = (f"{len(q['float_products'])} Performer products in float" if q.get('float_products')
                    else 'all products int8')
        rows.append(f"| {r['date']} | {r.get('cpu', r['device'])} | {r['checkpoint']} | "
                    f"{names[q.get('runtime', 'onnxruntime')]} | "
                    f"{q['calibration_images']} training images, {q.get('calibration_method', 'MinMax')}, "
                    f"{products} | {q['images']:,} | {q['fp32_top1']:.2f}% | "
                    f"{q['int8_top1']:.2f}% | {q['top1_drop']:.2f} | {q['top1_agreement']:.2f}% |")
    return '\n'.join(rows)


def heap_ab_table(record: dict) -> str:
    """The heap A/B: each benchmark process (one per arm), then the median over the arms."""
    rows = ['| process | heap | run | T2T-ViT-14 images/s | DeiT-S images/s | per MAC against DeiT-S | '
            'MFU T2T-ViT-14 | MFU DeiT-S |', '|---|---|---|---:|---:|---:|---:|---:|']
    heap = {True: 'kept', False: "glibc's"}
    for arm in record['benchmark_runs']:
        for i, r in enumerate(arm['runs']):
            process, kind = (f"{arm['file']}, {arm['date'][11:16]}", heap[arm['kept']]) if i == 0 else ('', '')
            rows.append(f"| {process} | {kind} | {r['run']} ({r['reps']} rounds) | {r['t2t_images_per_s']:.1f} | "
                        f"{r['deit_images_per_s']:.1f} | {r['per_mac']:.2f} | {r['t2t_mfu']:.1%} | "
                        f"{r['deit_mfu']:.1%} |")
    arms = sum(arm['kept'] for arm in record['benchmark_runs'])  # as many of each
    for key, m in record['benchmark_median_over_arms'].items():
        run, kind = key.split()
        rows.append(f"| median of {arms} | {heap[kind == 'kept']} | {run} | | | "
                    f"**{m['per_mac']:.2f}** | {m['t2t_mfu']:.1%} | {m['deit_mfu']:.1%} |")
    return '\n'.join(rows)


def split_table(record: dict) -> str:
    """Where T2T-ViT-14's time goes against DeiT-S's: whole models, blocks alone and the T2T module alone, per mode,
    as the median and the fastest of the rounds."""
    rows = ['| mode (rounds) | of the rounds | T2T-ViT-14, s | its blocks, s | its T2T module, s | DeiT-S, s | '
            "DeiT-S's blocks, s | per MAC, whole | per MAC, blocks | T2T module's share of time (of MACs) | "
            'T2T module at parity, s |', '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for mode, label in (('infer', 'fp32 inference'), ('train', 'fp32 training')):
        run = record['split'][mode]
        for stat, word in (('median', 'median'), ('min', 'fastest')):
            s, t = run[stat]['seconds'], run[stat]
            first = f"{label} ({run['rounds']})" if stat == 'median' else ''
            rows.append(f"| {first} | {word} | {s['t2t']:.2f} | "
                        f"{s['t2t_blocks']:.2f} | {s['t2t_module']:.2f} | {s['deit']:.2f} | {s['deit_blocks']:.2f} | "
                        f"{t['per_mac_whole']:.2f} | {t['per_mac_blocks']:.2f} | "
                        f"{t['t2t_module_share_of_time']:.1%} ({t['t2t_module_share_of_macs']:.1%}) | "
                        f"{t['t2t_module_budget_s']:.2f} |")
    return '\n'.join(rows)


# the dated runs behind docs/speed.md, host by host
SPEED_LOG = 'docs/speed-log.md'

# name in docs -> (document, function, benchmark file)
TABLES = {
    'speed': ('docs/speed.md', speed_table, 'amd-epyc-2026-11-27.json'),
    'complexity': ('docs/speed.md', complexity_table, 'amd-epyc-2026-11-27.json'),
    'speed-intel-amx': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06.json'),
    'speed-intel-amx-layout-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-layout-ab.json'),
    'speed-intel-amx-quiet': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-quiet.json'),
    'speed-intel-amx-quiet-layout-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-quiet-layout-ab.json'),
    'speed-intel-amx-quiet-attn-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-quiet-attn-ab.json'),
    'speed-intel-amx-packed-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-packed-ab.json'),
    'speed-intel-amx-page-chunks-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-page-chunks-ab.json'),
    'speed-intel-amx-packed-paged': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-packed-paged.json'),
    'speed-intel-amx-split-chunks-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-split-chunks-ab.json'),
    'speed-intel-amx-plan': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-plan.json'),
    'speed-intel-amx-plan-3': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-plan-3.json'),
    'speed-intel-amx-gelu-apart-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-gelu-apart-ab.json'),
    'speed-intel-amx-gelu-apart-ab-1': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-06-gelu-apart-ab-1.json'),
    'speed-intel-amx-batch-chunks-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-batch-chunks-ab.json'),
    'speed-intel-amx-batch-chunks-ab-train': (SPEED_LOG, host_table,
                                              'intel-xeon-amx-2026-12-07-batch-chunks-ab-train.json'),
    'speed-intel-amx-onednn-train-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-onednn-train-ab.json'),
    'speed-intel-amx-onednn-train-ab-2': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-onednn-train-ab-2.json'),
    'speed-intel-amx-compiled-splits-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-compiled-splits-ab.json'),
    'speed-intel-amx-compiled-splits-ab-infer': (SPEED_LOG, host_table,
                                                 'intel-xeon-amx-2026-12-07-compiled-splits-ab-infer.json'),
    'speed-intel-amx-compiled-attn-ab': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-compiled-attn-ab.json'),
    'speed-intel-amx-eager-compiled': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-eager-compiled.json'),
    'speed-intel-amx-plan-4': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-plan-4.json'),
    'speed-intel-amx-plan-5': (SPEED_LOG, host_table, 'intel-xeon-amx-2026-12-07-plan-5.json'),
    'speed-intel-amx-standing': ('docs/speed.md', plan_runs_table, None),
    'speed-hosts': ('docs/speed.md', hosts_table, None),
    'speed-amd-avx2': (SPEED_LOG, host_table, 'amd-epyc-avx2-2026-12-07.json'),
    'speed-amd-avx2-train': (SPEED_LOG, host_table, 'amd-epyc-avx2-2026-12-07-train.json'),
    'speed-amd-avx2-train-bf16': (SPEED_LOG, host_table, 'amd-epyc-avx2-2026-12-07-train-bf16.json'),
    'speed-amd-avx2-compiled-splits-ab': (SPEED_LOG, host_table, 'amd-epyc-avx2-2026-12-07-compiled-splits-ab.json'),
    'heap-amd-avx2': (SPEED_LOG, heap_ab_table, HEAP_AB),
    'split-amd-avx2': (SPEED_LOG, split_table, 'amd-epyc-avx2-2026-12-07-split.json'),
    'demo': ('docs/training.md', demo_table, 'demo-fashion_mnist.json'),
    'recipe-search': ('docs/training.md', recipe_search_table, 'demo-fashion_mnist.json'),
    'ablation': ('docs/ablation.md', ablation_table, 'ablate-fashion_mnist-2026-11-27.json'),
    'study': ('docs/ablation.md', study_table, STUDY),
    'findings': ('docs/ablation.md', findings_table, STUDY),
    'findings-default': ('docs/ablation.md', findings_table, DEFAULT_STUDY),
    'size-sweep': ('docs/ablation.md', size_sweep_table, STUDY),
    'compare': ('docs/ablation.md', compare_table, STUDY.replace('.json', '-compare.json')),
    'models': ('README.md', models_table, None),
    'int8-speed': ('docs/speed.md', int8_speed_table, INT8_BENCHMARK),
    'int8-speed-export': ('docs/export.md', int8_speed_table, INT8_BENCHMARK),
    'int8-speed-amd-avx2': ('docs/speed.md', int8_speed_table, 'amd-epyc-avx2-2026-12-07-int8.json'),
    'int8-accuracy': ('docs/export.md', int8_accuracy_table, 'demo-fashion_mnist-int8.json'),
}


def stale_tables() -> List[str]:
    problems = []
    for name, (doc, make, source) in TABLES.items():
        table = make(load_benchmark(source) if source else None)
        if table not in (REPO / doc).read_text():
            problems.append(f'{doc}: the {name} table is not {f"benchmarks/{source}" if source else "the code"}\'s; '
                            f'regenerate it with '
                            f'`python tests/docs_check.py --table {name}`:\n{table}')
    return problems


def rewrite(example: Example, printed: List[List[str]], model: Optional[str] = None) -> None:
    """Replace the example's shown output in its document by what its commands printed, and the `model=` of its
    marker by `model` (the demo model that printed it)."""
    lines = example.path.read_text().splitlines()
    start = example.line  # the first line inside the fence
    end = next(i for i in range(start, len(lines)) if lines[i].startswith('```'))
    body = []
    for (command, _), got in zip(example.steps, printed):
        body += [f'$ {command}'] + got
    if model is not None:
        options = [o for o in MARKER.fullmatch(lines[start - 2].strip()).group(2).split() if not o.startswith('model=')]
        lines[start - 2] = f'<!-- check: {example.kind} ' + ' '.join([f'model={model}'] + options) + ' -->'
    example.path.write_text('\n'.join(lines[:start] + body + lines[end:]) + '\n')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--demo', type=Path, help=f'the demo run folder (e.g. {DEMO_RUN}): also check its examples')
    parser.add_argument('--data', type=Path, default=REPO / 'data' / 'fashion-mnist',
                        help='Fashion-MNIST folder the samples come from')
    parser.add_argument('--table', choices=list(TABLES), help='print a table from its benchmark file and stop')
    parser.add_argument('--write', action='store_true',
                        help='with --demo: write what the demo examples print into the documents (after a new '
                             'demo model), instead of comparing')
    args = parser.parse_args(argv)
    if args.table:
        _, make, source = TABLES[args.table]
        print(make(load_benchmark(source) if source else None))
        return 0
    problems = [p for path in markdown_files() for p in broken_links(path)] + stale_tables()
    kinds = {'fast', 'python'} | ({'demo'} if args.demo else set())
    if args.demo and not (args.demo / 'best.pth').is_file():
        print(f'error: {args.demo}/best.pth not found; run `make demo` first', file=sys.stderr)
        return 2
    work = scratch_folder(args.demo, args.data if args.demo else None)
    demo = demo_model(args.demo) if args.demo else None
    checked = 0
    to_write = []
    for path in markdown_files():
        for example in examples(path):  # in order: the ONNX example reads what the export example wrote
            if example.kind in kinds:
                printed: List[List[str]] = []
                found = run_example(example, work, printed, demo)
                why_form = form_only(example, demo)
                if why_form and not args.write:
                    print(f'{example.where}: {why_form}', file=sys.stderr)
                if args.write and example.kind == 'demo':
                    to_write.append((example, printed))
                else:
                    problems += found
                checked += 1
    for example, printed in reversed(to_write):  # from the end: a rewrite leaves earlier line numbers valid
        rewrite(example, printed, demo.id)
    for p in problems:
        print(p, file=sys.stderr)
    print(f'{len(markdown_files())} documents, {checked} examples run ({", ".join(sorted(kinds))}): '
          f'{len(problems)} problem(s)')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(main())
