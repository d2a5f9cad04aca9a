#!/usr/bin/env python
"""GPU check of the SpecVerify Triton kernel: correctness against the NumPy reference, then speed.

Run on a CUDA machine (torch with CUDA, triton, numpy; no tensorrt or network needed):

    PYTHONUNBUFFERED=1 python tools/gpu_check.py --quick

For every (B, G, V, dtype) of the grid it draws a random case (mixed greedy/sampling rows,
verify lengths 0..G, drafts that the target often accepts), compares the kernel (both the
per-row and the split-V path) and the torch composite with `reference.spec_verify`, then times
kernel and composite (CUDA graphs, CUDA events, medians) on a full-acceptance sampling batch
against the HBM bound (logits bytes / measured device-copy bandwidth). It prints one table and
writes JSON to $OUT (or ./). Exit status 1 when any row disagrees beyond the documented
rounding at acceptance and inverse-CDF boundaries (spec.md, "Ties and rounding").

The CPU-side pieces (argument parsing, the grid, case generation, the row classifier, the table)
import without torch or triton, so tests/test_spec_verify.py runs them on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "tools"))
from device_env import bootstrap  # noqa: E402  (tools/ is not a package)

bootstrap()  # the lent GPU runs a bare checkout, nothing installed
from dspark_plugins.spec_verify.reference import RESIDUAL_EPS, softmax, spec_verify  # noqa: E402

FULL_B = (1, 8, 32)
FULL_G = (1, 4, 7, 16)
FULL_V = (4096, 49152, 151936, 262144)
DTYPES = ("float32", "float16", "bfloat16")
QUICK_BG = ((1, 16), (8, 7), (32, 4))
ACCEPT_RTOL = 1e-5  # p(x) from differently ordered fp32 sums differs by a few ulp
LABELS = ("exact", "accept_boundary", "cdf_boundary", "mismatch")

__all__ = ["LABELS", "classify_rows", "format_table", "grid", "make_case", "main", "parse_args",
           "summarize"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; --quick keeps a lent GPU's run under about four minutes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="every V and dtype, but (B, G) only in (1,16), (8,7), (32,4), plus (32,16,V=262144,bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions (median is reported)")
    parser.add_argument("--inner", type=int, default=10, help="graph replays per timed repetition")
    parser.add_argument("--no-bench", action="store_true", help="correctness only")
    parser.add_argument("--max-cases", type=int, default=0, help="stop after this many grid cases (0: all)")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="start no new case after this many seconds (0: none), so the table still prints")
    parser.add_argument("--out", type=Path, default=None, help="JSON folder (default: $OUT or .)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of the correctness part in Triton's interpreter (needs --no-bench)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.inner < 1:
        parser.error("--reps and --inner must be >= 1")
    if args.device == "cpu" and not args.no_bench:
        parser.error("--device cpu times nothing: add --no-bench")
    return args


def grid(quick: bool) -> list[tuple[int, int, int, str]]:
    """(B, G, V, dtype) cases; the full grid is every combination of the issue's values."""
    if quick:
        cases = [(b, g, v, d) for v in FULL_V for d in DTYPES for b, g in QUICK_BG]
        return cases + [(32, 16, 262144, "bfloat16")]
    return [(b, g, v, d) for v in FULL_V for d in DTYPES for b in FULL_B for g in FULL_G]


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # shipped with onnx

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _sample_rows(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(probs, axis=-1, dtype=np.float32)
    return np.minimum((cdf <= (uniforms * cdf[..., -1])[..., None]).sum(-1), probs.shape[-1] - 1)


def make_case(rng: np.random.Generator, b: int, g: int, v: int, dtype: str = "float32", *,
              greedy_fraction: float = 0.25, draft_noise: float = 1.0) -> dict[str, np.ndarray]:
    """A random SpecVerify input whose drafts the target often accepts.

    Sampling rows draw drafts from q = softmax((logits + noise) / T); greedy rows propose the
    target's argmax 70 % of the time, with a one-hot q as markov.onnx emits.
    """
    logits = (rng.standard_normal((b, g + 1, v), dtype=np.float32) * 3).astype(_numpy_dtype(dtype))
    x = logits[:, :g].astype(np.float32)
    greedy = rng.random(b) < greedy_fraction
    temperature = np.where(greedy, rng.choice([0.0, -1.0], b), rng.choice([0.6, 1.0, 1.3], b))
    temperature = temperature.astype(np.float32)
    t_safe = np.where(greedy, 1.0, temperature).astype(np.float32)[:, None, None]
    noise = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(draft_noise)
    draft_probs = softmax((x + noise) / t_safe)
    draft_ids = _sample_rows(draft_probs, rng.random((b, g), dtype=np.float32)).astype(np.int64)
    target_ids = x.argmax(-1)
    keep = rng.random((b, g)) < 0.7
    random_ids = rng.integers(0, v, (b, g))
    greedy_ids = np.where(keep, target_ids, random_ids)
    draft_ids = np.where(greedy[:, None], greedy_ids, draft_ids).astype(np.int64)
    one_hot = np.zeros_like(draft_probs)
    np.put_along_axis(one_hot, draft_ids[..., None], 1.0, axis=-1)
    draft_probs = np.where(greedy[:, None, None], one_hot, draft_probs).astype(np.float32)
    return {
        "target_logits": logits,
        "draft_ids": draft_ids,
        "draft_probs": draft_probs,
        "verify_lengths": rng.integers(0, g + 1, b).astype(np.int64),
        "temperature": temperature,
        "uniforms": rng.random((b, g + 1), dtype=np.float32),
    }


def _cdf_tolerance(v: int) -> float:
    """Relative distance of u * total from a cdf boundary inside which fp32 orders may disagree."""
    return 1e-6 + 8.0 * np.sqrt(v) * 2.0 ** -24


def _classify_row(case: dict[str, np.ndarray], row: int, ref: tuple[int, np.ndarray],
                  got: tuple[int, np.ndarray]) -> str:
    a_ref, tok_ref = ref
    a_got, tok_got = got
    if a_ref == a_got and np.array_equal(tok_ref, tok_got):
        return "exact"
    t = case["temperature"][row]
    if t <= 0:
        return "mismatch"  # greedy is exact: first argmax of the same fp32 values
    x = case["target_logits"][row].astype(np.float32)
    p = softmax(x / t)
    g = case["draft_ids"].shape[1]
    v = x.shape[-1]
    if a_ref != a_got:
        k = min(a_ref, a_got)
        if k >= case["verify_lengths"][row]:
            return "mismatch"
        draft = case["draft_ids"][row, k]
        lhs = np.float64(case["uniforms"][row, k]) * case["draft_probs"][row, k, draft]
        near = abs(lhs - p[k, draft]) <= ACCEPT_RTOL * p[k, draft] + 1e-30
        return "accept_boundary" if near else "mismatch"
    a = a_ref
    if not (np.array_equal(tok_ref[:a], tok_got[:a]) and np.array_equal(tok_ref[a + 1:], tok_got[a + 1:])):
        return "mismatch"
    weights = p[a]
    if a < case["verify_lengths"][row]:
        residual = np.maximum(p[a] - case["draft_probs"][row, a], np.float32(0))
        if residual.sum(dtype=np.float32) > RESIDUAL_EPS:
            weights = residual
    cdf = np.cumsum(weights.astype(np.float64))
    threshold = np.float64(case["uniforms"][row, g]) * cdf[-1]
    lo, hi = sorted((int(tok_ref[a]), int(tok_got[a])))
    if not 0 <= lo < hi < v:
        return "mismatch"
    # Tokens lo..hi differ only if every cdf boundary between them lies at the threshold.
    boundaries = cdf[lo:hi]
    near = np.all(np.abs(boundaries - threshold) <= _cdf_tolerance(v) * cdf[-1])
    return "cdf_boundary" if near else "mismatch"


def classify_rows(case: dict[str, np.ndarray], ref: tuple[np.ndarray, np.ndarray],
                  got: tuple[np.ndarray, np.ndarray]) -> list[str]:
    """Label each row: exact, accept_boundary, cdf_boundary (documented rounding) or mismatch."""
    acc_ref, tok_ref = (np.asarray(r) for r in ref)
    acc_got, tok_got = (np.asarray(r) for r in got)
    if tok_got.shape != tok_ref.shape or acc_got.shape != acc_ref.shape:
        return ["mismatch"] * len(acc_ref)
    return [_classify_row(case, i, (int(acc_ref[i]), tok_ref[i]), (int(acc_got[i]), tok_got[i]))
            for i in range(len(acc_ref))]


def summarize(labels: list[str]) -> dict[str, int]:
    """Counts per label (every label present, zeros included)."""
    return {label: labels.count(label) for label in LABELS}


def full_accept_bytes(b: int, g: int, v: int, itemsize: int) -> int:
    """Bytes a full-acceptance verify must read: every logit once, plus the small inputs and outputs."""
    return b * (g + 1) * v * itemsize + b * (g * 8 + g * 4 + 8 + 4 + (g + 1) * 4) + b * (8 + (g + 1) * 8)


COLUMNS = (("B", "{}"), ("G", "{}"), ("V", "{}"), ("dtype", "{}"), ("rows", "{}"),
           ("exact", "{}"), ("bound.", "{}"), ("bad", "{}"), ("kernel us", "{:.1f}"),
           ("per-row us", "{:.1f}"), ("torch us", "{:.1f}"), ("HBM us", "{:.1f}"),
           ("x bound", "{:.2f}"), ("x torch", "{:.2f}"))


def format_table(results: list[dict[str, Any]]) -> str:
    """One aligned text table; `bound.` counts documented boundary cases, `bad` real mismatches.

    `kernel us` is spec_verify_triton's default path (split-V below half the SMs' rows),
    `per-row us` the per-row kernel alone (what the TensorRT AOT plugin runs).
    """
    rows = []
    for r in results:
        values = (r["B"], r["G"], r["V"], r["dtype"], r["rows"], r["exact"],
                  r["accept_boundary"] + r["cdf_boundary"], r["mismatch"], r.get("kernel_us"),
                  r.get("per_row_us"), r.get("torch_us"), r.get("hbm_us"), r.get("kernel_over_bound"),
                  r.get("torch_over_kernel"))
        rows.append([("-" if val is None else fmt.format(val)) for (_, fmt), val in zip(COLUMNS, values)])
    header = [name for name, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- GPU side


def _to_torch(torch, array: np.ndarray, device: str):
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).to(device).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def copy_bandwidth(torch, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of `reps`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def time_call(torch, fn: Callable[[], Any], reps: int, inner: int) -> tuple[float, str]:
    """Median microseconds per call: CUDA-graph replays (launch overhead excluded) or eager."""
    fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        run, mode = graph.replay, "graph"
    except Exception:  # a launcher that cannot be captured is timed eagerly
        run, mode = fn, "eager"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times), mode


def _full_accept_inputs(torch, b: int, g: int, v: int, dtype: str):
    """Sampling rows whose drafts are all accepted (q = p): the most logits a verify reads."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn((b, g + 1, v), device="cuda", generator=gen) * 3).to(getattr(torch, dtype))
    x = logits[:, :g].float()
    return (logits, x.argmax(-1), torch.softmax(x, -1), torch.full((b,), g, device="cuda"),
            torch.ones(b, device="cuda"), torch.rand((b, g + 1), device="cuda", generator=gen) * 0.999)


def _check_case(torch, args: argparse.Namespace, rng: np.random.Generator, b: int, g: int, v: int,
                dtype: str, bandwidth: float | None) -> dict[str, Any]:
    """Label counts of the three implementations on one random case, then the timings."""
    from dspark_plugins.spec_verify.torch_composite import spec_verify_torch
    from dspark_plugins.spec_verify.triton_kernel import spec_verify_triton

    case = make_case(rng, b, g, v, dtype)
    ref = spec_verify(**case)
    inputs = [_to_torch(torch, case[name], args.device) for name in case]
    labels, boundary = [], {}
    for name, impl in (("per_row", lambda: spec_verify_triton(*inputs, split_v=False)),
                       ("split_v", lambda: spec_verify_triton(*inputs, split_v=True)),
                       ("torch", lambda: spec_verify_torch(*inputs))):
        impl_labels = classify_rows(case, ref, tuple(t.cpu().numpy() for t in impl()))
        boundary[name] = sum(label.endswith("boundary") for label in impl_labels)
        labels += impl_labels
    row: dict[str, Any] = {"rows": len(labels), **summarize(labels), "boundary_by_impl": boundary}
    if bandwidth is not None:
        bench = _full_accept_inputs(torch, b, g, v, dtype)
        row["kernel_us"], row["kernel_timing"] = time_call(
            torch, lambda: spec_verify_triton(*bench), args.reps, args.inner)
        row["per_row_us"], _ = time_call(
            torch, lambda: spec_verify_triton(*bench, split_v=False), args.reps, args.inner)
        row["torch_us"], row["torch_timing"] = time_call(
            torch, lambda: spec_verify_torch(*bench), args.reps, args.inner)
        row["hbm_us"] = full_accept_bytes(b, g, v, bench[0].element_size()) / bandwidth * 1e6
        row["kernel_over_bound"] = row["kernel_us"] / row["hbm_us"]
        row["torch_over_kernel"] = row["torch_us"] / row["kernel_us"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (--device cpu --no-bench runs the interpreter)", file=sys.stderr)
        return 2
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    bandwidth = None if args.no_bench else copy_bandwidth(torch)
    cases = grid(args.quick)
    if args.max_cases:
        cases = cases[:args.max_cases]
    results = []
    for b, g, v, dtype in cases:
        if args.time_limit and time.time() - t0 > args.time_limit:
            print(f"  time limit reached: {len(cases) - len(results)} cases not run", flush=True)
            break
        row = {"B": b, "G": g, "V": v, "dtype": dtype}
        try:
            row.update(_check_case(torch, args, rng, b, g, v, dtype, bandwidth))
        except Exception as exc:  # report the case and go on: one table, whatever happens
            row.update(rows=0, **summarize([]), mismatch=1, error=f"{type(exc).__name__}: {exc}"[:300])
        results.append(row)
        print(f"  [{time.time() - t0:6.1f}s] B={b} G={g} V={v} {dtype}: "
              + ", ".join(f"{k}={row[k]}" for k in LABELS) + (f"  ERROR {row['error']}" if "error" in row else ""),
              flush=True)
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    print()
    print(f"SpecVerify on {device} (torch {torch.__version__}"
          + (f", copy bandwidth {bandwidth / 1e9:.0f} GB/s" if bandwidth else "") + "); rows = batch rows "
          "x 3 implementations (per-row kernel, split-V kernel, torch composite); timings: "
          "full-acceptance sampling batch, CUDA-graph replays, median us per call")
    print(format_table(results))
    bad = sum(r["mismatch"] for r in results)
    boundary = sum(r["accept_boundary"] + r["cdf_boundary"] for r in results)
    eager = [f"{r['B']}/{r['G']}/{r['V']}/{r['dtype']}" for r in results
             if "eager" in (r.get("kernel_timing"), r.get("torch_timing"))]
    by_impl = {name: sum(r.get("boundary_by_impl", {}).get(name, 0) for r in results)
               for name in ("per_row", "split_v", "torch")}
    print(f"boundary cases by implementation: {by_impl}")
    print(f"\n{sum(r['rows'] for r in results)} rows: {bad} mismatches, {boundary} documented "
          f"boundary cases, {sum('error' in r for r in results)} errors; {time.time() - t0:.0f} s"
          + (f"; timed eagerly (no CUDA graph): {', '.join(eager)}" if eager else ""))
    out_dir = args.out or Path(os.environ.get("OUT") or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "torch": torch.__version__,
              "copy_bandwidth_bytes_per_s": bandwidth, "quick": args.quick, "seed": args.seed,
              "results": results}
    (out_dir / "spec_verify_gpu_check.json").write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
