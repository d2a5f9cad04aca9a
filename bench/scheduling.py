"""Verify budget and expected throughput of each scheduler under load (the paper's load figure).

Request states come from real rounds of the bundle: it runs on calibration-corpus prompts with
the full-block schedule (every draft verified), recording per round the raw confidence logits
and how many drafts greedy verification accepted (`dspark_export.calibrate.record_prompts`).
The recording goes to bench/results/scheduling_rounds.json, with the bundle's SPS table and STS
temperatures, so the bench reruns from that file alone. The prompts are the corpus prompts that
follow the ones `calibrate` used (build_corpus is deterministic and prefix-stable), so the
calibration is never scored on its own data.

For each concurrency B (1 to 64) and trial, B request states are drawn with replacement: one
request's rounds t-2, t-1, t (the async scheduler decides its budget from the confidences of two
steps back). Each scheduler turns the calibrated confidences of round t into verify lengths l_r,
and the recorded outcome gives the tokens it would have produced: 1 + min(accepted_r, l_r) per
request (greedy verification of a prefix does not depend on what follows it). Then

    verify tokens per request  = mean(1 + l_r)                  (MTP-1: 2)
    throughput (tokens/s)      = sum_trials sum_r (1 + min(a_r, l_r)) / sum_trials 1/SPS(B_tok)
                               (B_tok = sum_r (1 + l_r): the long-run rate of Theta = tau * SPS)
    per-request speed          = throughput / B

and `predicted_tokens_per_s` replaces the recorded outcome by the schedulers' own expectation,
sum_r (1 + sum_{j<=l_r} a_{r,j}) with a the calibrated prefix survival. Schedulers: fixed gamma
(whole block), threshold (static, 0.5 on calibrated per-step c), hardware (Algorithm 1), async
(production variant) and MTP-1 (one draft per request). SPS(B) is the bundle's table
(`sps_table.json`), interpolated, extrapolated past its last point as sps.py describes.
No timing asserts: the figures are as good as the SPS table they come from.

    python bench/scheduling.py --bundle DIR [--num-prompts 24] [--max-new-tokens 128]
    python bench/scheduling.py                 # rerun from bench/results/scheduling_rounds.json
    python bench/scheduling.py --sps OTHER_sps_table.json   # e.g. a GPU engine's curve
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROUNDS_FILE = RESULTS / "scheduling_rounds.json"
CONCURRENCY = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SCHEDULERS = ("fixed", "threshold", "hardware", "async", "mtp1")
LABELS = {"fixed": "fixed gamma", "threshold": "threshold 0.5", "hardware": "hardware (Alg. 1)",
          "async": "async (production)", "mtp1": "MTP-1 (1 draft)"}


def record(bundle: Path, num_prompts: int, max_new_tokens: int, seed: int, skip: int | None,
           threads: int | None, out: Path) -> dict:
    """Run the bundle on corpus prompts after the calibration's own; save rounds + tables."""
    from dspark_export.calibrate import record_prompts
    from dspark_export.distill_data import build_corpus, corpus_digest
    from dspark_runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, backend="cpu", schedule="fixed", threads=threads)
    if pipe.sps is None:
        raise SystemExit(f"{bundle}: the bundle has no sps_table.json; rebuild it with profiling")
    fitted = {}
    cal_path = bundle / "calibration.json"
    if pipe.calibration is not None and cal_path.is_file():
        fitted = json.loads(cal_path.read_text()).get("fitted_on") or {}
    if skip is None:  # the prompts calibrate used, when they came from the same corpus
        source = fitted.get("prompts") or {}
        skip = source.get("n_prompts", 0) if source.get("seed", seed) == seed and \
            source.get("source") == "distill_data.build_corpus" else 0
    prompts = build_corpus(skip + num_prompts, seed)[skip:]
    started = time.time()
    rounds = record_prompts(pipe, [p.text for p in prompts], max_new_tokens=max_new_tokens,
                            seed=seed, on_batch=lambda i, n, part: print(
                                f"  batch {i}/{n}: {len(part)} rounds, tau {part.tau():.2f}",
                                flush=True))
    meta = {
        "bundle": str(bundle),
        "prompts": {"source": "distill_data.build_corpus", "seed": seed, "skip": skip,
                    "n_prompts": len(prompts), "digest": corpus_digest(prompts)},
        "max_new_tokens": max_new_tokens,
        "record_s": round(time.time() - started, 1),
        "sps_table": pipe.sps.to_json(),
        "calibration": None if pipe.calibration is None else {
            "temperatures": pipe.calibration.temperatures, "fitted_on": fitted},
    }
    rounds.save(out, **meta)
    print(f"recorded {len(rounds)} rounds from {len(prompts)} prompts (tau {rounds.tau():.2f}) "
          f"in {meta['record_s']} s -> {out}")
    return json.loads(out.read_text())


def make_schedulers(gamma: int, sps, threshold: float) -> dict:
    from dspark_runtime.schedule import (AsyncScheduler, FixedScheduler, HardwareScheduler,
                                         ThresholdScheduler)

    return {"fixed": FixedScheduler(gamma), "threshold": ThresholdScheduler(threshold),
            "hardware": HardwareScheduler(sps), "async": AsyncScheduler(sps),
            "mtp1": FixedScheduler(1)}


def simulate(rounds, confidences: np.ndarray, sps, concurrency: list[int], trials: int,
             threshold: float, seed: int) -> dict:
    """Per scheduler, per concurrency: budgets and throughputs (see the module docstring)."""
    gamma = rounds.gamma
    # States: (row of t-2, row of t-1, row of t) of one request, round t fully verified.
    order = np.lexsort((rounds.step, rounds.request))
    req, ver = rounds.request[order], rounds.verified[order]
    same = (req[2:] == req[:-2]) & (ver[2:] == gamma)
    states = order[np.stack([np.arange(len(req) - 2), np.arange(1, len(req) - 1),
                             np.arange(2, len(req))], axis=1)[same]]
    if len(states) == 0:
        raise SystemExit("no request has three recorded rounds; record longer generations")
    survival = np.cumprod(confidences, axis=1)
    schedulers = make_schedulers(gamma, sps, threshold)
    rng = np.random.default_rng(seed)
    out = {name: [] for name in SCHEDULERS}
    for b in concurrency:
        active = np.ones(b, dtype=bool)
        sums = {name: np.zeros(5) for name in SCHEDULERS}  # l, tokens, predicted, time, B_tok
        for _ in range(trials):
            pick = states[rng.integers(len(states), size=b)]
            now = pick[:, 2]
            for name, sched in schedulers.items():
                sched.reset()
                if name == "async":
                    for k in (0, 1):
                        sched.verify_lengths(confidences[pick[:, k]], active)
                lengths = sched.verify_lengths(confidences[now], active)
                b_tok = int(np.sum(1 + lengths))
                tokens = np.sum(1 + np.minimum(rounds.accepted[now], lengths))
                mask = np.arange(1, gamma + 1)[None, :] <= lengths[:, None]
                predicted = b + np.sum(survival[now] * mask)
                sums[name] += (lengths.sum(), tokens, predicted, 1.0 / sps(b_tok), b_tok)
        for name in SCHEDULERS:
            l_sum, tokens, predicted, seconds, b_tok = sums[name]
            out[name].append({
                "concurrency": b,
                "verify_tokens_per_request": 1 + l_sum / (b * trials),
                "drafts_per_request": l_sum / (b * trials),
                "tokens_per_step_per_request": tokens / (b * trials),
                "verify_batch_tokens": b_tok / trials,
                "tokens_per_s": tokens / seconds,
                "predicted_tokens_per_s": predicted / seconds,
                "per_request_tokens_per_s": tokens / seconds / b,
            })
    return out


def print_table(results: dict, concurrency: list[int]) -> None:
    head = f"{'B':>3} " + " ".join(f"{LABELS[n]:>19}" for n in SCHEDULERS)
    for title, key, fmt in (("verify tokens per request (1 + drafts)",
                             "verify_tokens_per_request", "{:19.2f}"),
                            ("throughput, tokens/s (recorded acceptance)", "tokens_per_s",
                             "{:19.1f}"),
                            ("per-request speed, tokens/s", "per_request_tokens_per_s",
                             "{:19.2f}"),
                            ("tokens per step per request (tau)",
                             "tokens_per_step_per_request", "{:19.2f}")):
        print(f"\n{title}\n{head}")
        for i, b in enumerate(concurrency):
            print(f"{b:>3} " + " ".join(fmt.format(results[n][i][key]) for n in SCHEDULERS))


def plot(results: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"fixed": "s-", "threshold": "^-", "hardware": "o-", "async": "D-", "mtp1": "x--"}
    for name in SCHEDULERS:
        xs = [r["concurrency"] for r in results[name]]
        axes[0].plot(xs, [r["verify_tokens_per_request"] for r in results[name]], styles[name],
                     label=LABELS[name], ms=4)
        axes[1].plot(xs, [r["tokens_per_s"] for r in results[name]], styles[name],
                     label=LABELS[name], ms=4)
    for ax, ylabel in zip(axes, ("verify tokens per request", "throughput (tokens/s)")):
        ax.set_xscale("log", base=2)
        ticks = [x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256) if x <= max(xs)]
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    sps = meta["sps_table"]
    fig.suptitle(f"gamma {meta['gamma']}, tau (full block) {meta['tau']:.2f}, SPS table: "
                 f"{sps['device']} ({sps['backend']}, measured to "
                 f"{sps['points'][-1]['tokens']} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="record new rounds from this bundle")
    parser.add_argument("--rounds", type=Path, default=ROUNDS_FILE,
                        help="recorded rounds (written when --bundle is given)")
    parser.add_argument("--sps", type=Path, help="use this sps_table.json instead")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--skip", type=int, default=None,
                        help="corpus prompts to skip (default: those calibrate used)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "scheduling.json")
    args = parser.parse_args()

    from dspark_export.calibrate import Rounds
    from dspark_runtime.calibration import apply_sts, fit_sts, sigmoid
    from dspark_runtime.sps import SPSTable

    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.bundle is not None:
        data = record(args.bundle, args.num_prompts, args.max_new_tokens, args.seed, args.skip,
                      args.threads, args.rounds)
    elif args.rounds.is_file():
        data = json.loads(args.rounds.read_text())
    else:
        raise SystemExit(f"{args.rounds} does not exist: pass --bundle DIR to record rounds")
    rounds = Rounds.from_json(data, source=str(args.rounds))
    sps = SPSTable.load(args.sps) if args.sps else SPSTable.from_json(data["sps_table"])
    if data.get("calibration"):
        temperatures = np.asarray(data["calibration"]["temperatures"])
        calibration = "the bundle's calibration.json"
    else:  # uncalibrated bundle: fit on these rounds (in-sample, said so in the output)
        temperatures = fit_sts(rounds.logits, rounds.labels())
        calibration = "STS fitted in-sample on the recorded rounds (bundle not calibrated)"
    confidences = apply_sts(rounds.logits, temperatures)
    meta = {"bundle": data.get("bundle"), "rounds_file": str(args.rounds),
            "rounds": len(rounds), "gamma": rounds.gamma, "tau": rounds.tau(),
            "acceptance_per_position": rounds.acceptance_per_position(),
            "temperature": rounds.temperature, "prompts": data.get("prompts"),
            "calibration": calibration, "temperatures": temperatures.tolist(),
            "mean_raw_confidence": sigmoid(rounds.logits).mean(axis=0).tolist(),
            "mean_calibrated_confidence": confidences.mean(axis=0).tolist(),
            "sps_table": sps.to_json(), "sps_source": str(args.sps or "bundle"),
            "trials": args.trials, "threshold": args.threshold, "seed": args.seed}
    print(f"{len(rounds)} rounds, gamma {rounds.gamma}, tau (full block) {rounds.tau():.2f}; "
          f"SPS: {sps.device} ({sps.backend}), {sps.batch_tokens[0]}..{sps.batch_tokens[-1]} "
          f"tokens measured; calibration: {calibration}")
    started = time.time()
    results = simulate(rounds, confidences, sps, args.concurrency, args.trials, args.threshold,
                       args.seed)
    meta["simulate_s"] = round(time.time() - started, 1)
    print_table(results, args.concurrency)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(results, meta, png)
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
