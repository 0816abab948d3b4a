"""The markdown of a `zeroray bench` sitting, from its results dict alone (so a saved JSON renders
again): the targets first, then one table per section measured."""

from __future__ import annotations

MB = 1e6


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "fraction":
        return f"{value:.1%}"
    if unit == "seconds":
        return f"{value:.1f} s"
    return f"{value:.3f}"


def fmt_margin(margin: float | None, unit: str) -> str:
    if margin is None:
        return "—"
    if unit == "fraction":
        return f"{margin * 100:+.1f} pts"
    if unit == "seconds":
        return f"{margin:+.1f} s"
    return f"{margin:+.3f}"


def _verdict(target: dict) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[target["met"]]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def targets_table(targets: list[dict]) -> list[str]:
    rows = []
    for t in targets:
        bound = f"{'≥' if t['op'] == '>=' else '≤'} {fmt(t['target'], t['unit'])}"
        rows.append([t["figure"], fmt(t["value"], t["unit"]), bound, _verdict(t),
                     fmt_margin(t["margin"], t["unit"])])
    return _table(["figure", "measured", "target", "verdict", "margin"], rows)


def _overhead(r: dict) -> list[str]:
    rows = [[str(x["stage"]), f"{x['zeroray_tokens_per_s']:.0f}", f"{x['handwritten_tokens_per_s']:.0f}",
             f"{x['ratio']:.3f}", x["precision"]] for x in r["rows"]]
    return [f"## Overhead: zeroray ÷ hand-written DeepSpeed loop ({r['config']}, {r['workers']} workers × "
            f"{r['threads_per_worker']} thread, micro-batch {r['micro_batch_size']}; steps {r['warmup'] + 1}–"
            f"{r['steps']})", "",
            *_table(["ZeRO stage", "zeroray tokens/s", "hand-written tokens/s", "ratio", "precision"], rows)]


def _mfu(r: dict) -> list[str]:
    rows = [[x["run"], f"{x['params'] / 1e6:.1f}M", f"{x['flops_per_token']:.3g}", f"{x['tokens_per_s']:.0f}",
             f"{x['flop_per_s'] / 1e9:.1f}", f"{x['peak_flop_per_s'] / 1e9:.0f} ({x['dtype']})",
             f"{x['mfu']:.1%}"] for x in r["rows"]]
    return ["## MFU: model FLOP/s ÷ peak matmul FLOP/s measured in this sitting", "",
            *_table(["run", "params", "FLOPs/token", "tokens/s", "GFLOP/s", "peak GFLOP/s", "MFU"], rows)]


def _scaling(r: dict) -> list[str]:
    rows = [[str(x["stage"]), f"{x['one_worker_tokens_per_s']:.0f}", f"{x['two_workers_tokens_per_s']:.0f}",
             f"{x['ratio']:.3f}"] for x in r["rows"]]
    return [f"## Scaling: 2 workers × 1 thread ÷ 1 worker × 2 threads (global batch {r['global_batch']})", "",
            *_table(["ZeRO stage", "1 worker tokens/s", "2 workers tokens/s", "ratio"], rows)]


def _memory(r: dict) -> list[str]:
    rows = []
    for x in r["rows"]:
        m, p = x["measured"], x["paper"]
        pairs = [f"{m[c] / MB:.1f} / {p[c] / MB:.1f}" for c in ("params", "grads", "optimizer", "total")]
        peaks = [f"{peak / MB:.0f} (+{(peak - before) / MB:.0f})"
                 for peak, before in zip(x["peak_rss_bytes"], x["rss_before_bytes"], strict=True)]
        rows.append([str(x["stage"]), x["optimizer_class"], *pairs, f"{x['ratio']:.3f}",
                     f"{m['buffers'] / MB:.1f}", " / ".join(peaks)])
    header = ["ZeRO stage", "DeepSpeed optimizer", "params", "grads", "optimizer state", "total",
              "measured ÷ paper", "other buffers", "peak RSS per rank (growth in the stage)"]
    return [f"## Memory: model states per rank, measured / ZeRO paper, MB ({r['config']}, "
            f"Ψ = {r['params'] / 1e6:.2f}M, N = {r['ranks']})", "",
            *_table(header, rows), "", *(f"- {note}" for note in r.get("notes", []))]


def _models(r: dict) -> list[str]:
    rows = [[x["label"], f"{x['params'] / 1e6:.2f}M", f"{x['active_params'] / 1e6:.2f}M",
             f"{x['flops_per_token']:.3g}", f"{x['step_s']:.3f}", f"{x['tokens_per_s']:.0f}",
             f"{x['mfu']:.1%}", f"{x['peak_rss_growth_bytes'] / MB:.0f}"] for x in r["rows"]]
    header = ["arm", "params", "active", "FLOPs/token", "step (s)", "tokens/s", "MFU", "peak memory (MB)"]
    out = [f"## Models: tiny configs, one process, {r['threads']} thread, bf16 weights, AdamW (bf16 peak "
           f"{r['bf16_peak_flop_per_s'] / 1e9:.0f} GFLOP/s)", "", *_table(header, rows)]
    if "realistic" in r:
        big = r["realistic"]
        rows = [[x["config"], f"{x['params'] / 1e6:.0f}M", f"{x['active_params'] / 1e6:.0f}M",
                 f"{x['flops_per_token']:.3g}", str(x["seq_len"]), f"{x['fwd_bwd_s']:.1f}",
                 f"{x['tokens_per_s']:.0f}", f"{x['mfu']:.1%}", f"{x['peak_rss_growth_bytes'] / MB:.0f}"]
                for x in big["rows"]]
        header = ["config", "params", "active", "FLOPs/token", "seq", "fwd+bwd (s)", "tokens/s", "MFU",
                  "peak memory (MB)"]
        out += ["", f"Realistic configs: one forward + backward of one sequence, {big['threads']} threads "
                f"(bf16 peak {big['bf16_peak_flop_per_s'] / 1e9:.0f} GFLOP/s; MFU counts forward + backward "
                "as 2/3 of a step)", "", *_table(header, rows)]
    return out


def _architecture(results: dict) -> list[str]:
    out = ["## Architecture overheads: step time ratios, tiny configs, interleaved in one process", ""]
    if "hc" in results:
        out.append(f"- DHC×4 ÷ residual: {results['hc']['dhc4_over_residual']:.3f}; "
                   f"SHC×4 ÷ residual: {results['hc']['shc4_over_residual']:.3f}"
                   + (f"; mHC×4 ÷ residual: {results['hc']['mhc4_over_residual']:.3f}"
                      if "mhc4_over_residual" in results["hc"] else ""))
    if "moe" in results:
        out.append(f"- MoE top-2 of 8 (dropless) ÷ dense with the same active parameters: "
                   f"{results['moe']['top2of8_over_dense']:.3f}")
    return out


def _startup(r: dict) -> list[str]:
    rows = [[p["phase"], f"{p['seconds']:.1f}"] for p in r["phases"]]
    out = [f"## Start-up: {r['command']} → first optimizer step: {r['first_step_s']:.1f} s", "",
           *_table(["phase", "seconds"], rows)]
    probe = r.get("probe")
    if probe:
        imports = " · ".join(f"{i['module']} {i['seconds']:.1f}" for i in probe["imports"])
        out += ["", f"Imports in a fresh interpreter, seconds each adds: {imports}"]
    return out


def _pipeline(r: dict) -> list[str]:
    rows = [[name, f"{r['runs'][name][0]['first_batch_s']:.1f}", f"{r[f'{name}_tokens_per_s']:.0f}"]
            for name in ("zeroray", "naive")]
    rows.append(["trainer's consumption per rank (demo, ZeRO-2)", "—",
                 f"{r['trainer_tokens_per_s_per_rank']:.0f}"])
    return [f"## Data pipeline alone, one rank (data.loader_workers={r['loader_workers']}), "
            f"{r['batches']} batches of {r['tokens_per_batch']} tokens", "",
            *_table(["pipeline", "first batch (s)", "tokens/s"], rows), "",
            f"zeroray ÷ trainer: {r['vs_trainer']:.1f}×; zeroray ÷ naive: {r['vs_naive']:.2f}×"]


BEFORE_ARCHITECTURE = {"overhead": _overhead, "mfu": _mfu, "scaling": _scaling, "memory": _memory,
                       "models": _models}
AFTER_ARCHITECTURE = {"startup": _startup, "pipeline": _pipeline}


def render(results: dict) -> str:
    versions = ", ".join(f"{k} {x}" for k, x in results.get("versions", {}).items())
    lines = [f"# zeroray bench, {results['date']} ({results['mode']})", "",
             f"{results['machine']}, {results['cpus']} CPUs; {versions}. Every figure is a ratio against a "
             "baseline measured in the same sitting.", "",
             "## Targets", "", *targets_table(results["targets"])]
    for section, error in results.get("errors", {}).items():
        lines += ["", f"Section {section} failed: {error.splitlines()[0]}"]
    for section, table in BEFORE_ARCHITECTURE.items():
        if section in results:
            lines += ["", *table(results[section])]
    if "hc" in results or "moe" in results:
        lines += ["", *_architecture(results)]
    for section, table in AFTER_ARCHITECTURE.items():
        if section in results:
            lines += ["", *table(results[section])]
    return "\n".join(lines) + "\n"
