"""`use_cpu_kernels` chooses its kernels per host: each profile, forced here, keeps the plain model's numbers."""
import copy
import json

import pytest
import torch

from t2tvit import use_cpu_kernels
from t2tvit.cpu_kernels import (
    CPU_KERNELS, CPU_PROFILE_ENV, CPU_PROFILES, ONEDNN_CHOICES, CPUKernelError, _PLANS, cpu_kernel_state,
    detect_profile, host_cpu, host_kernel_plan, onednn_available, planned_kernels)
from t2tvit.errors import InputError
from t2tvit.models import T2TViT

TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2., token_dim=8, num_classes=4)

# /proc/cpuinfo lines of the hosts each profile stands for (flags cut to the ones that decide, plus a few others)
EPYC = ('vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n'
        'flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n')
SAPPHIRE_RAPIDS = ('vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n'
                   'flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8\n\n')
ICE_LAKE = ('vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n'
            'flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n')
ZEN2 = 'vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx2\n\n'
ARM = 'processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n\n'


@pytest.mark.parametrize('cpuinfo,profile,flags', [
    (EPYC, 'amd-avx512', ['avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni']),
    (SAPPHIRE_RAPIDS, 'intel-amx', ['avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'avx_vnni', 'amx_tile',
                                    'amx_bf16', 'amx_int8']),
    (ICE_LAKE, 'generic', ['avx2', 'avx512f', 'avx512_vnni']),
    (ZEN2, 'generic', ['avx2']),
    (ARM, 'generic', []),
])
def test_cpu_flags_decide_the_profile(tmp_path, cpuinfo, profile, flags):
    path = tmp_path / 'cpuinfo'
    path.write_text(cpuinfo + cpuinfo.replace('processor\t: 0', 'processor\t: 1'))  # every core repeats its lines
    cpu = host_cpu(str(path))
    assert cpu['flags'] == flags
    assert detect_profile(cpu) == profile
    assert cpu['torch_capability'] == torch.backends.cpu.get_cpu_capability()


def test_no_cpuinfo_is_the_generic_profile(tmp_path):
    cpu = host_cpu(str(tmp_path / 'missing'))
    assert cpu['flags'] == [] and detect_profile(cpu) == 'generic'


def test_every_profile_decides_every_kernel_with_a_reason():
    assert set(_PLANS) == set(CPU_PROFILES)
    for profile, plan in _PLANS.items():
        assert list(plan) == list(CPU_KERNELS), profile
        assert all(isinstance(on, bool) and len(reason) > 20 for on, reason in plan.values()), profile
    # the AMD host's choices are the ones measured there: every kernel on but those written after them
    written_after = {'page_chunks', 'packed_weights', 'split_chunks', 'bf16_gelu_apart', 'compiled_splits',
                     'short_attn'}
    assert {k for k, (on, _) in _PLANS['amd-avx512'].items() if not on} == written_after
    # training products by oneDNN, packed weights and the GELU apart are choices within oneDNN's products: only
    # where onednn_linear is on
    assert ONEDNN_CHOICES == {'onednn_linear_train', 'packed_weights', 'bf16_gelu_apart'}
    assert all(plan['onednn_linear'][0] or not any(plan[k][0] for k in ONEDNN_CHOICES) for plan in _PLANS.values())
    # with AMX the fused SDPA kernel does its bf16 products on AMX; explicit bf16 products only without it
    assert not _PLANS['intel-amx']['bf16_cpu_attn'][0] and not _PLANS['generic']['bf16_cpu_attn'][0]
    # MKL's fp32 products are native on Intel: oneDNN's fused products in inference, MKL's in fp32 training
    assert _PLANS['intel-amx']['onednn_linear'][0] and not _PLANS['intel-amx']['onednn_linear_train'][0]
    assert _PLANS['amd-avx512']['onednn_linear_train'][0]
    # in training the fused kernel's CPU backward is the slow part: explicit products there on AMX too
    assert _PLANS['intel-amx']['bf16_cpu_attn_train'][0] and not _PLANS['generic']['bf16_cpu_attn_train'][0]
    # under torch.compile inductor's fused gather indexes element by element on any CPU: the op everywhere but
    # on the AMD host, whose kernels stay as measured there
    assert _PLANS['intel-amx']['compiled_splits'][0] and _PLANS['generic']['compiled_splits'][0]
    # explicit products for short sequences: measured on the AVX2-only AMD EPYC (generic) only
    assert _PLANS['generic']['short_attn'][0] and not _PLANS['intel-amx']['short_attn'][0]


@pytest.mark.parametrize('profile', list(CPU_PROFILES))
def test_forced_profile_is_recorded_as_json(profile, monkeypatch):
    monkeypatch.setenv(CPU_PROFILE_ENV, profile)
    plan = host_kernel_plan()
    assert plan['profile'] == profile and plan['profile_source'] == CPU_PROFILE_ENV
    assert json.loads(json.dumps(plan)) == plan
    expected = {name: on for name, (on, _) in _PLANS[profile].items()}
    if not onednn_available():
        expected['onednn_linear'] = False
    assert {name: choice['on'] for name, choice in plan['kernels'].items()} == expected
    assert planned_kernels() == tuple(name for name, on in expected.items() if on)
    other = next(p for p in CPU_PROFILES if p != profile)
    assert host_kernel_plan(other)['profile'] == other  # the argument wins over the environment


def test_without_a_forced_profile_the_host_decides(monkeypatch):
    monkeypatch.delenv(CPU_PROFILE_ENV, raising=False)
    plan = host_kernel_plan()
    assert plan['profile'] == detect_profile(host_cpu())
    assert plan['profile_source'] == 'detected from the CPU flags'


def test_unknown_profile_is_an_input_error(monkeypatch):
    with pytest.raises(CPUKernelError, match=r"CPU profile 'intel' \(argument\) is not one of amd-avx512, "
                                             r"intel-amx, generic"):
        host_kernel_plan('intel')
    monkeypatch.setenv(CPU_PROFILE_ENV, 'zen')
    with pytest.raises(InputError, match=f"'zen' \\({CPU_PROFILE_ENV}\\)"):
        use_cpu_kernels(T2TViT(**TINY))


@pytest.mark.parametrize('profile', list(CPU_PROFILES))
@pytest.mark.parametrize('variant', [dict(tokens_type='performer'), dict(tokens_type='transformer'),
                                     dict(tokens_type='performer', block_type='se')])
def test_each_profile_keeps_outputs_and_gradients(profile, variant, monkeypatch):
    monkeypatch.setenv(CPU_PROFILE_ENV, profile)
    torch.manual_seed(0)
    plain = T2TViT(**TINY, **variant)
    fast = use_cpu_kernels(copy.deepcopy(plain))
    fast.tokens_to_token.chunk_tokens = 1  # batch_chunks and page_chunks, where the profile has them, engaged
    fast.tokens_to_token.page_bytes = 1
    state = cpu_kernel_state(fast)
    expected = set(planned_kernels())
    if variant['tokens_type'] == 'transformer':
        expected.discard('performer_fusion')
    assert {name for name, on in state.items() if on} == expected
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for model in (fast, plain):
        model.eval()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            outs.append(model(x).float())
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0.1)  # bf16: within bf16 rounding
    torch.testing.assert_close(outs[1], outs[3], rtol=0, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_benchmark_environment_records_the_plan(monkeypatch):
    from t2tvit.tools.benchmark import environment
    monkeypatch.setenv(CPU_PROFILE_ENV, 'generic')
    env = environment(torch.device('cpu'))
    assert env['cpu_kernels'] == host_kernel_plan()
    assert env['cpu_kernels']['profile'] == 'generic'
