"""Freed memory kept for reuse on CPU (`t2tvit.cpu_heap`): glibc's thresholds set once, left alone where the
allocator is another's or already tuned, and what it changes: a step's fresh pages."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import t2tvit.cpu_heap as cpu_heap
import t2tvit.cpu_kernels as cpu_kernels

GLIBC = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(cpu_heap, '_STATE', None)


class FakeMallopt:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def __call__(self, param, value):
        self.calls.append((param, value))
        return self.answer


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_keep_heap_pages_sets_both_thresholds_once(fresh_state):
    mallopt = FakeMallopt()
    state = cpu_heap.keep_heap_pages(environ={}, mallopt=mallopt)
    assert mallopt.calls == [(-3, 64 << 20), (-1, 512 << 20)]  # M_MMAP_THRESHOLD, then M_TRIM_THRESHOLD
    assert state == {'kept': True, 'mmap_threshold': 64 << 20, 'trim_threshold': 512 << 20}
    assert cpu_heap.keep_heap_pages(environ={}, mallopt=mallopt) == state and len(mallopt.calls) == 2
    assert cpu_heap.heap_state() == state


@pytest.mark.parametrize('environ, libc, answer, why', [
    ({'T2TVIT_KEEP_HEAP': '0'}, 'glibc', 1, 'T2TVIT_KEEP_HEAP=0'),
    ({'MALLOC_TRIM_THRESHOLD_': '131072'}, 'glibc', 1, 'the environment tunes the allocator (MALLOC_TRIM_THRESHOLD_)'),
    ({'LD_PRELOAD': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'}, 'glibc', 1, 'another allocator is preloaded'),
    ({}, '', 1, 'not glibc\'s allocator'),
    ({}, 'glibc', 0, 'glibc refused the thresholds (mallopt)'),
], ids=['switched-off', 'tuned', 'jemalloc', 'musl', 'refused'])
def test_keep_heap_pages_leaves_another_allocator_or_a_tuned_one(fresh_state, monkeypatch, environ, libc, answer, why):
    monkeypatch.setattr(cpu_heap.platform, 'system', lambda: 'Linux')
    monkeypatch.setattr(cpu_heap.platform, 'libc_ver', lambda: (libc, '2.36' if libc else ''))
    mallopt = FakeMallopt(answer)
    state = cpu_heap.keep_heap_pages(environ=environ, mallopt=mallopt)
    assert state['kept'] is False and state['why'].startswith(why)
    assert mallopt.calls == ([(-3, 64 << 20)] if answer == 0 else [])


def test_commands_keep_heap_pages_on_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, 'keep_heap_pages', lambda: calls.append(1))
    model = nn.Linear(2, 2)
    assert cpu_kernels.for_device(model, torch.device('meta')) is model and calls == []
    cpu_kernels.for_device(model, torch.device('cpu'))
    assert calls == [1]


@pytest.mark.skipif(not GLIBC, reason='glibc only')
def test_kept_heap_pages_are_not_faulted_in_again():
    """T2T-ViT-14 inference at batch 16, each arm in a fresh process: by glibc's own thresholds most steps fault in
    thousands to tens of thousands of fresh pages (the heap's top swings past what glibc keeps); with them kept, next
    to none."""
    script = textwrap.dedent('''
        import resource, sys, timm, torch, t2tvit
        from t2tvit.cpu_heap import keep_heap_pages
        if sys.argv[1] == 'keep':
            assert keep_heap_pages(environ={})['kept']
        torch.set_num_threads(2)
        model = t2tvit.use_cpu_kernels(timm.create_model('t2t_vit_14').eval())
        x = torch.randn(16, 3, 224, 224)
        with torch.inference_mode():
            for _ in range(3):  # the heap grows to what a step needs
                model(x)
            faults = []
            for _ in range(6):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                model(x)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(*faults)
    ''')
    faults = {}
    for arm in ('glibc', 'keep'):
        proc = subprocess.run([sys.executable, '-c', script, arm], capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')})
        assert proc.returncode == 0, proc.stderr
        faults[arm] = [int(n) for n in proc.stdout.split()[-6:]]  # fresh 4 KiB pages, step by step
    # glibc's: thousands to tens of thousands a step by host (a quiet step now and then), so the bound is on all six;
    # kept: none in most steps, a few thousand in one while the heap grows
    assert sum(faults['glibc']) > 10000, faults
    assert sorted(faults['keep'])[3] == 0 and sum(faults['keep']) * 5 < sum(faults['glibc']), faults


def test_benchmark_records_the_heap_setting_it_ran_under():
    from t2tvit.tools.benchmark import environment

    assert environment(torch.device('cpu'))['heap'] == cpu_heap.heap_state()
