"""The model as `timm.create_model` returns it, through every standard PyTorch tool: each matches eager.

One model per tokenizer (Performer and transformer tokens, the convolution and patch tokenizers), each checked at
two batch sizes; the tools that take a dynamic height and width are also checked at a second, non-square size.
fp32 tools must agree with eager to 1e-5, onnxruntime to 1e-4, and timm's FX extraction bit for bit.
"""
import io
import os
import warnings
from typing import Callable, Dict, List, Tuple

import pytest
import timm
import torch
from timm.layers import create_feature_extractor

import t2tvit  # noqa: F401  (registers the models)

# (name, kwargs): the registered builders; the larger ones cut to two blocks to keep the suite quick
MODELS: Dict[str, Tuple[str, dict]] = {
    'performer': ('t2t_vit_7', {}),
    'transformer': ('t2t_vit_t_14', dict(depth=2)),
    'convolution': ('t2t_vit_c_14', dict(depth=2)),
    'patch': ('t2t_vit_p_14', dict(depth=2)),
}
BATCHES = (1, 3)
OTHER_SIZE = (160, 192)  # a second height/width for the tools that take any


def _model(tokens_type: str, **kwargs) -> torch.nn.Module:
    name, model_kwargs = MODELS[tokens_type]
    torch.manual_seed(0)
    return timm.create_model(name, **dict(model_kwargs, **kwargs)).eval()


def _inputs(sizes: List[Tuple[int, int]] = ((224, 224),)) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, h, w, generator=g) for h, w in sizes for b in BATCHES]


def _max_diff(model: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor], inputs: List[torch.Tensor]) -> float:
    """Largest |tool - eager| over `inputs`, also printed (`pytest -s` shows the table of every tool)."""
    worst = 0.
    with torch.no_grad():
        for x in inputs:
            expected = model(x)
            got = run(x)
            assert got.shape == expected.shape
            worst = max(worst, (got - expected).abs().max().item())
    print(f'\n{os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}: max |difference| {worst:.2e} over '
          f'{[tuple(x.shape) for x in inputs]}')
    return worst


@pytest.mark.parametrize('tokens_type', MODELS)
def test_torchscript_script(tokens_type):
    model = _model(tokens_type)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit is deprecated in favour of torch.export
        scripted = torch.jit.script(model)
        assert _max_diff(model, scripted, _inputs()) <= 1e-5
        dynamic = _model(tokens_type, dynamic_img_size=True)
        assert _max_diff(dynamic, torch.jit.script(dynamic), _inputs([OTHER_SIZE])) <= 1e-5


@pytest.mark.parametrize('tokens_type', MODELS)
def test_torchscript_trace(tokens_type):
    model = _model(tokens_type)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(model, torch.randn(2, 3, 224, 224), check_trace=False)
    assert _max_diff(model, traced, _inputs()) <= 1e-5


@pytest.mark.parametrize('tokens_type', MODELS)
def test_fx_feature_extractor_is_bit_identical(tokens_type):
    """timm's FX extraction (its notrace modules and functions) computes the same bits as eager."""
    model = _model(tokens_type)
    graph = create_feature_extractor(model, return_nodes={'head': 'logits', 'norm': 'tokens'})
    with torch.inference_mode():
        for x in _inputs():
            out = graph(x)
            assert torch.equal(out['logits'], model(x))
            assert torch.equal(out['tokens'], model.forward_features(x))


@pytest.mark.parametrize('tokens_type', MODELS)
def test_torch_export_with_dynamic_batch_height_and_width(tokens_type):
    model = _model(tokens_type, dynamic_img_size=True)
    dims = {0: torch.export.Dim('batch', min=1, max=256), 2: torch.export.Dim('height', min=32, max=1024),
            3: torch.export.Dim('width', min=32, max=1024)}
    program = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: dims[0], 2: dims[2],
                                                                                            3: dims[3]},))
    assert _max_diff(model, program.module(), _inputs([(224, 224), OTHER_SIZE])) <= 1e-5
    fixed = _model(tokens_type)  # the default model: any batch at its own size
    program = torch.export.export(fixed, (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: dims[0]},))
    assert _max_diff(fixed, program.module(), _inputs()) <= 1e-5


@pytest.mark.parametrize('tokens_type', MODELS)
def test_torch_compile_fullgraph(tokens_type):
    model = _model(tokens_type)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    assert _max_diff(model, compiled, _inputs()) <= 1e-5


def _onnxruntime(proto: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort
    session = ort.InferenceSession(proto, providers=['CPUExecutionProvider'])
    return lambda x: torch.from_numpy(session.run(None, {'x': x.numpy()})[0])


@pytest.mark.parametrize('tokens_type', MODELS)
def test_onnx_legacy_exporter_with_dynamic_batch(tokens_type):
    model = _model(tokens_type)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), buffer, dynamo=False, input_names=['x'],
                          output_names=['logits'], dynamic_axes={'x': {0: 'b'}, 'logits': {0: 'b'}}, opset_version=17)
    assert _max_diff(model, _onnxruntime(buffer.getvalue()), _inputs()) <= 1e-4


@pytest.mark.parametrize('tokens_type', MODELS)
def test_onnx_dynamo_exporter_with_dynamic_batch_height_and_width(tokens_type):
    model = _model(tokens_type, dynamic_img_size=True)
    dims = {0: torch.export.Dim('batch', min=1, max=256), 2: torch.export.Dim('height', min=32, max=1024),
            3: torch.export.Dim('width', min=32, max=1024)}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), dynamo=True, dynamic_shapes=(dims,),
                                    input_names=['x'], output_names=['logits'], optimize=False, verbose=False)
    proto = program.model_proto.SerializeToString()
    assert _max_diff(model, _onnxruntime(proto), _inputs([(224, 224), OTHER_SIZE])) <= 1e-4


@pytest.mark.parametrize('tokens_type', ['performer', 'transformer'])
def test_model_with_cpu_kernels_still_compiles(tokens_type):
    model = _model(tokens_type)
    fast = t2tvit.use_cpu_kernels(_model(tokens_type))
    compiled = torch.compile(fast)
    assert _max_diff(model, compiled, _inputs()) <= 1e-5
