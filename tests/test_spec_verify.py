"""SpecVerify: NumPy reference, ONNX function on ONNX Runtime CPU, torch composite, gpu_check's
CPU side, and (where the packages or a GPU exist) the Triton kernel and the TensorRT plugin."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from dspark_plugins.spec_verify import onnx_function as of
from dspark_plugins.spec_verify.reference import inverse_cdf_sample, softmax, spec_verify
from dspark_runtime.backends import BackendUnavailable

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


@pytest.fixture(scope="module")
def sessions():
    """One ORT CPU session per logits dtype, all running the function body."""
    import onnxruntime as ort

    return {d: ort.InferenceSession(of.make_verify_model(logits_dtype=d).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
            for d in ("float32", "float16", "bfloat16")}


def _run_onnx(sessions, case):
    import onnxruntime as ort

    feeds = dict(case)
    logits = case["target_logits"]
    if logits.dtype.name == "bfloat16":  # ORT takes bfloat16 as raw 16-bit words
        feeds["target_logits"] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            logits.view(np.uint16), onnx.TensorProto.BFLOAT16)
    return tuple(sessions[logits.dtype.name].run(None, feeds))


def _assert_agree(case, ref, got, max_boundary: int = 0):
    labels = gpu_check.classify_rows(case, ref, got)
    counts = gpu_check.summarize(labels)
    assert counts["mismatch"] == 0, counts
    assert counts["accept_boundary"] + counts["cdf_boundary"] <= max_boundary, counts


def _case(logits, draft_ids, draft_probs, lengths, temperature, uniforms):
    return {"target_logits": np.asarray(logits, np.float32), "draft_ids": np.asarray(draft_ids, np.int64),
            "draft_probs": np.asarray(draft_probs, np.float32), "verify_lengths": np.asarray(lengths, np.int64),
            "temperature": np.asarray(temperature, np.float32), "uniforms": np.asarray(uniforms, np.float32)}


# ----------------------------------------------------------------------------- the ONNX model


def test_model_is_checker_and_shape_inference_clean():
    model = of.make_verify_model()
    assert model.ir_version == 10
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    dims = {o.name: [d.dim_param for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output}
    assert dims == {"accepted": ["B"], "tokens": ["B", "G_plus_1"]}
    (node,) = model.graph.node
    assert (node.domain, node.op_type, list(node.attribute)) == ("dspark", "SpecVerify", [])
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("dspark", 1)}


def test_strip_function_tags_node_for_tensorrt():
    model = of.make_verify_model(opset=19)
    stripped = of.strip_function(model)
    assert len(model.functions) == 1 and len(stripped.functions) == 0
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in stripped.graph.node[0].attribute}
    assert attrs == {"plugin_namespace": b"dspark", "aot": 1}
    assert "aot" not in {a.name for a in of.strip_function(model, aot=False).graph.node[0].attribute}
    onnx.checker.check_model(stripped)


def test_model_options_are_validated():
    with pytest.raises(ValueError, match="opset >= 18"):
        of.make_verify_model(opset=17)
    with pytest.raises(ValueError, match="logits_dtype"):
        of.make_verify_model(logits_dtype="int8")


# ----------------------------------------------------------------------------- reference == ONNX


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("b,g,v", [(16, 1, 8), (16, 4, 33), (12, 7, 256), (4, 16, 1000)])
def test_reference_matches_onnx_random(sessions, dtype, b, g, v):
    rng = np.random.default_rng(1000 * g + v)
    for _ in range(3):
        case = gpu_check.make_case(rng, b, g, v, dtype, greedy_fraction=0.3)
        _assert_agree(case, spec_verify(**case), _run_onnx(sessions, case))


def test_verify_length_zero_samples_from_p_or_argmax(sessions):
    rng = np.random.default_rng(3)
    case = gpu_check.make_case(rng, 8, 4, 50)
    case["verify_lengths"][:] = 0
    accepted, tokens = spec_verify(**case)
    assert (accepted == 0).all() and (tokens[:, 1:] == -1).all()
    x = case["target_logits"].astype(np.float32)
    for row in range(8):
        t = case["temperature"][row]
        expected = (inverse_cdf_sample(softmax(x[row, 0] / t), case["uniforms"][row, 4]) if t > 0
                    else np.argmax(x[row, 0]))
        assert tokens[row, 0] == expected
    _assert_agree(case, (accepted, tokens), _run_onnx(sessions, case))


def test_full_acceptance_emits_bonus(sessions):
    rng = np.random.default_rng(4)
    b, g, v = 6, 5, 40
    logits = rng.normal(size=(b, g + 1, v)) * 3
    p = softmax(logits[:, :g].astype(np.float32))
    ids = np.argmax(logits[:, :g], -1)
    temperature = [0, 1, 0, 1, -1, 1]
    probs = np.where(np.array(temperature)[:, None, None] > 0, p, np.eye(v)[ids])
    case = _case(logits, ids, probs, [g] * b, temperature, rng.random((b, g + 1)) * 0.99)
    accepted, tokens = spec_verify(**case)
    assert (accepted == g).all() and (tokens[:, :g] == ids).all()
    greedy = np.array(temperature) <= 0
    assert (tokens[greedy, g] == np.argmax(logits[greedy, g], -1)).all()
    _assert_agree(case, (accepted, tokens), _run_onnx(sessions, case))


def test_residual_with_one_nonzero_entry(sessions):
    # Draft 3 has p = 0 (rejected for any u); max(0, p - q) is non-zero only at token 0.
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.2, 0.35, 0.25, 0.2])
    logits = np.where(p > 0, np.log(np.maximum(p, 1e-30)), -200.0)  # exp underflows to 0
    for u in (0.0, 0.37, 0.999):
        case = _case(np.stack([logits, logits])[None], [[3]], [[q]], [1], [1.0], [[u, u]])
        accepted, tokens = spec_verify(**case)
        assert accepted.tolist() == [0] and tokens.tolist() == [[0, -1]]
        got = _run_onnx(sessions, case)
        assert got[0].tolist() == [0] and got[1].tolist() == [[0, -1]]


def test_residual_without_mass_falls_back_to_p(sessions):
    # q == p and the draft has p = 0: rejected, residual is all zero, so the correction ~ p.
    logits = np.array([2.0, 1.0, 0.5, -200.0], np.float32)
    q = softmax(logits)
    assert q[3] == 0
    for u in (0.1, 0.6, 0.95):
        case = _case(np.stack([logits, logits])[None], [[3]], [[q]], [1], [1.0], [[0.5, u]])
        accepted, tokens = spec_verify(**case)
        assert accepted[0] == 0 and tokens[0, 0] == inverse_cdf_sample(softmax(logits.astype(np.float32)), u)
        assert [a.tolist() for a in _run_onnx(sessions, case)] == [accepted.tolist(), tokens.tolist()]


def test_greedy_ties_take_the_first_index(sessions):
    logits = np.zeros((1, 2, 6), np.float32)
    logits[0, 0, [2, 5]] = 4.0
    logits[0, 1, [1, 4]] = 7.0
    for draft, expected in ((5, ([0], [[2, -1]])), (2, ([1], [[2, 1]]))):
        case = _case(logits, [[draft]], np.eye(6)[[[draft]]], [1], [0.0], [[0.5, 0.5]])
        assert [a.tolist() for a in spec_verify(**case)] == [expected[0], expected[1]]
        assert [a.tolist() for a in _run_onnx(sessions, case)] == [expected[0], expected[1]]


def test_inverse_cdf_rule():
    w = np.array([0.0, 0.25, 0.0, 0.75], np.float32)
    assert [int(inverse_cdf_sample(w, u)) for u in (0.0, 0.2, 0.25, 0.26, 0.99)] == [1, 1, 3, 3, 3]
    assert int(inverse_cdf_sample(np.ones(3, np.float32), np.float32(0.9999999))) == 2
    assert inverse_cdf_sample(np.stack([w, w[::-1]]), np.array([0.1, 0.1])).tolist() == [1, 0]


# ----------------------------------------------------------------------------- losslessness


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = len(probs) - 1
    try:
        from scipy.stats import chi2
    except ImportError:  # Wilson-Hilferty approximation of the chi-square tail
        z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
        return 0.5 * math.erfc(z / math.sqrt(2))
    return float(chi2.sf(stat, dof))


def _first_tokens(verify, n: int, p: np.ndarray, q: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = len(p)
    drafts = inverse_cdf_sample(np.broadcast_to(q, (n, v)), rng.random(n, dtype=np.float32))
    logits = np.broadcast_to(np.log(p), (n, 2, v))
    case = _case(logits, drafts[:, None], np.broadcast_to(q, (n, 1, v)), np.ones(n), np.ones(n),
                 rng.random((n, 2), dtype=np.float32))
    return np.bincount(verify(**case)[1][:, 0], minlength=v)


def _verify_without_residual(**case):
    """A wrong verifier: the correction is drawn from p instead of max(0, p - q)."""
    accepted, tokens = spec_verify(**case)
    g = case["draft_ids"].shape[1]
    p = softmax(case["target_logits"].astype(np.float32) / case["temperature"][:, None, None])
    rows = np.flatnonzero(accepted < case["verify_lengths"])
    tokens[rows, accepted[rows]] = inverse_cdf_sample(p[rows, accepted[rows]], case["uniforms"][rows, g])
    return accepted, tokens


P_TARGET = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
Q_DRAFT = np.array([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])


def test_first_token_is_distributed_as_target():
    counts = _first_tokens(spec_verify, 6000, P_TARGET, Q_DRAFT, seed=11)
    assert _chi_square_pvalue(counts, P_TARGET) > 1e-3


def test_wrong_verifier_is_detected():
    counts = _first_tokens(_verify_without_residual, 6000, P_TARGET, Q_DRAFT, seed=11)
    assert _chi_square_pvalue(counts, P_TARGET) < 1e-6


# ----------------------------------------------------------------------------- validation


def _valid_case():
    return gpu_check.make_case(np.random.default_rng(5), 3, 2, 7)


@pytest.mark.parametrize("name,bad,message", [
    ("target_logits", np.zeros((3, 7), np.float32), "target_logits must be a rank-3"),
    ("target_logits", np.zeros((3, 3, 7), np.int32), "target_logits must have dtype"),
    ("draft_ids", np.zeros((3, 3), np.int64), r"draft_ids must have shape \(3, 2\)"),
    ("draft_ids", np.zeros((3, 2), np.int32), "draft_ids must have dtype int64"),
    ("draft_ids", np.full((3, 2), 7, np.int64), r"draft_ids must lie in \[0, V=7\)"),
    ("draft_probs", np.zeros((3, 2, 6), np.float32), "draft_probs must have shape"),
    ("verify_lengths", np.array([0, 1, 3]), r"verify_lengths must lie in \[0, G=2\]"),
    ("temperature", np.ones(3, np.float64), "temperature must have dtype float32"),
    ("uniforms", np.ones((3, 3), np.float32), r"uniforms must lie in \[0, 1\)"),
    ("uniforms", np.zeros((3, 2), np.float32), "uniforms must have shape"),
])
def test_bad_inputs_are_rejected(name, bad, message):
    case = _valid_case()
    case[name] = bad
    with pytest.raises(ValueError, match=message):
        spec_verify(**case)


# ----------------------------------------------------------------------------- torch composite


def test_torch_composite_matches_reference():
    torch = pytest.importorskip("torch")
    from dspark_plugins.spec_verify.torch_composite import spec_verify_torch

    rng = np.random.default_rng(6)
    for dtype, (b, g, v) in [("float32", (16, 4, 64)), ("float16", (8, 7, 300)), ("float32", (4, 16, 1000))]:
        case = gpu_check.make_case(rng, b, g, v, dtype)
        got = spec_verify_torch(*(torch.from_numpy(a) for a in case.values()))
        _assert_agree(case, spec_verify(**case), tuple(t.numpy() for t in got))


# ----------------------------------------------------------------------------- gpu_check (CPU side)


def test_gpu_check_arguments_and_grid():
    args = gpu_check.parse_args(["--quick", "--reps", "3"])
    assert args.quick and args.reps == 3 and not args.no_bench
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--inner", "0"])
    full, quick = gpu_check.grid(False), gpu_check.grid(True)
    assert len(full) == 3 * 4 * 4 * 3 and set(quick) <= set(full)
    assert {c[2] for c in quick} == set(gpu_check.FULL_V) and {c[3] for c in quick} == set(gpu_check.DTYPES)


def test_gpu_check_classifier_separates_rounding_from_errors():
    case = gpu_check.make_case(np.random.default_rng(7), 12, 4, 64, greedy_fraction=0.5)
    ref = spec_verify(**case)
    assert gpu_check.summarize(gpu_check.classify_rows(case, ref, ref))["exact"] == 12
    accepted, tokens = (r.copy() for r in ref)
    tokens[:, 0] = (tokens[:, 0] + 1) % 64  # a wrong token in every row
    labels = gpu_check.classify_rows(case, ref, (accepted, tokens))
    assert labels.count("mismatch") >= 11
    # A uniform placed exactly on a cdf boundary: the neighbouring token is a boundary case.
    p = softmax(np.zeros(8, np.float32))
    case = _case(np.zeros((1, 2, 8)), [[0]], [[p]], [0], [1.0], [[0.5, 0.5]])
    ref = spec_verify(**case)
    assert ref[1].tolist() == [[4, -1]]
    labels = gpu_check.classify_rows(case, ref, (ref[0], np.array([[3, -1]])))
    assert labels == ["cdf_boundary"]
    assert gpu_check.classify_rows(case, ref, (ref[0], np.array([[1, -1]]))) == ["mismatch"]


def test_gpu_check_table_has_one_line_per_case():
    row = {"B": 1, "G": 4, "V": 4096, "dtype": "float16", "rows": 3, "exact": 3,
           "accept_boundary": 0, "cdf_boundary": 0, "mismatch": 0}
    timed = dict(row, kernel_us=12.5, per_row_us=20.0, torch_us=80.0, hbm_us=2.0,
                 kernel_over_bound=6.25, torch_over_kernel=6.4)
    lines = gpu_check.format_table([row, timed]).splitlines()
    assert len(lines) == 4 and "kernel us" in lines[0] and lines[2].rstrip().endswith("-")
    assert "12.5" in lines[3]


# ----------------------------------------------------------------------------- Triton and TensorRT


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_triton_module_imports_without_triton():
    from dspark_plugins.spec_verify import triton_kernel

    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed here; the missing-package error cannot be shown")
    with pytest.raises(triton_kernel.TritonUnavailable, match="triton"):
        triton_kernel.build_kernels()


INTERPRETER_SCRIPT = """
import numpy as np, torch, sys
sys.path.insert(0, {tools!r})
import gpu_check
from dspark_plugins.spec_verify import triton_kernel as tk
from dspark_plugins.spec_verify.reference import spec_verify
tk.BLOCK_BYTES, tk.CHUNK = 128, 64   # several loop steps and chunks on tiny vocabularies
rng = np.random.default_rng(8)
bad = 0
for dtype, (b, g, v) in [("float32", (6, 4, 150)), ("float16", (5, 7, 200)), ("float32", (3, 16, 70))]:
    case = gpu_check.make_case(rng, b, g, v, dtype, greedy_fraction=0.4)
    ref = spec_verify(**case)
    for split in (False, True):
        got = tk.spec_verify_triton(*(torch.from_numpy(a) for a in case.values()), split_v=split)
        labels = gpu_check.classify_rows(case, ref, tuple(t.numpy() for t in got))
        bad += labels.count("mismatch")
print("MISMATCHES", bad)
"""


def test_triton_kernel_in_interpreter_matches_reference():
    """The kernel's logic on CPU (TRITON_INTERPRET=1); skipped where triton is not installed."""
    pytest.importorskip("triton", reason="triton is not installed (it comes with CUDA torch)")
    pytest.importorskip("torch")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT.format(tools=str(ROOT / "tools"))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MISMATCHES 0" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (run tools/gpu_check.py on one)")
def test_triton_kernel_on_gpu_matches_reference():
    import torch

    from dspark_plugins.spec_verify.triton_kernel import spec_verify_triton

    rng = np.random.default_rng(9)
    for dtype in ("float32", "float16", "bfloat16"):
        case = gpu_check.make_case(rng, 8, 7, 49152, dtype)
        inputs = [gpu_check._to_torch(torch, a, "cuda") for a in case.values()]
        for split in (False, True):
            got = spec_verify_triton(*inputs, split_v=split)
            labels = gpu_check.classify_rows(case, spec_verify(**case), tuple(t.cpu().numpy() for t in got))
            assert labels.count("mismatch") == 0


def test_aot_kernel_compiles_to_tensorrt_argument_order():
    """PTX for sm_90 without a GPU: 6 input pointers, G, V, NC, 2 output pointers, nothing else."""
    pytest.importorskip("triton", reason="triton is not installed (it comes with CUDA torch)")
    import re

    from dspark_plugins.spec_verify.tensorrt_plugin import compile_aot_kernel

    name, ptx, meta = compile_aot_kernel("bfloat16", target=("cuda", 90, 32))
    params = re.search(rf"\.entry\s+{name}\s*\((.*?)\)", ptx, re.S).group(1).split(",")
    kinds = [p.split()[1] for p in params]
    assert kinds == [".u64"] * 6 + [".u32"] * 3 + [".u64"] * 2
    assert meta["num_warps"] == 8
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if ptxas.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            arch = re.search(r"\.target\s+(\w+)", ptx).group(1)  # sm_90a: Triton's Hopper target
            done = subprocess.run([str(ptxas), f"-arch={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr


def test_tensorrt_register_names_the_extra_when_missing():
    from dspark_plugins.spec_verify import tensorrt_plugin

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the missing-package error cannot be shown")
    with pytest.raises(BackendUnavailable, match=r"dspark-export\[tensorrt\]"):
        tensorrt_plugin.register()


@pytest.mark.tensorrt
def test_tensorrt_parser_maps_node_onto_plugin():
    trt = pytest.importorskip("tensorrt", reason="the TensorRT builder is not installable here")
    from dspark_plugins.spec_verify.tensorrt_plugin import register

    register()
    register()  # idempotent
    model = of.strip_function(of.make_verify_model(), aot=False)
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    assert parser.parse(model.SerializeToString()), [parser.get_error(i) for i in range(parser.num_errors)]
    assert network.num_outputs == 2
