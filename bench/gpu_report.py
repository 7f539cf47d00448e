"""bench/gpu.py's report: the targets it checks, and report.md from report.json (plain data, no torch)."""

GiB = 2**30

TITLES = {"machine": "Machine", "kernels": "1. Triton kernels vs the PyTorch reference",
          "train": "2. RPO train step (one pair, reference U-Net resident)",
          "sample": "3. Text-to-image: tinyrpo vs diffusers (DDIM, CFG 7.5, batch 1)",
          "fullrun": "4. Full default RPO run (random weights, real loaders)",
          "variants": "5. Variants: SDPA backend, channels_last, compile mode"}

# (key, header, format) per section; a column no item fills is left out.
COLUMNS = {
    "machine": [("tflops", "TFLOP/s", ".4g"), ("gb_per_s", "GB/s (read + write)", ".0f"), ("n", "n", "d"),
                ("mib", "MiB", "d")],
    "kernels": [("rel_err", "values: max rel. err", ".1e"), ("grad_err", "grads: fp32 rel. err / bf16 err÷bound", ".2g"),
                ("pass", "pass", ""), ("backend", "backend", ""), ("kernels_in_inductor_code", "in Inductor's code", ""), ("first_call_s", "1st call s", ".1f"),
                ("ms", "ms", ".3f"), ("fused_us", "fused µs", ".1f"), ("reference_us", "reference µs", ".1f"),
                ("speedup", "speed-up", ".2f")],
    "train": [("ms", "ms/step", ".1f"), ("min_ms", "min", ".1f"), ("max_ms", "max", ".1f"),
              ("first_step_s", "1st step s", ".1f"), ("tflops", "TFLOP/s", ".4g"), ("mfu_pct", "MFU %", ".1f"),
              ("mfu_matmul_pct", "% of matmul", ".1f"), ("peak_gib", "peak GiB", ".2f"),
              ("step_peak_gib", "step peak GiB", ".2f"), ("reserved_gib", "reserved GiB", ".2f"),
              ("state_gib", "between steps GiB", ".2f"),
              ("peak_rss_gib", "process peak RSS GiB", ".2f"), ("trainable_m", "trained M params", ".2f"),
              ("loss1", "loss@1", ".6f")],
    "sample": [("s_per_image", "s/image", ".3f"), ("vs_diffusers", "vs diffusers", ".2f"),
               ("ms_per_step", "ms/step", ".1f"), ("warmup_s", "1-step warm-up s", ".1f"),
               ("peak_above_weights_mib", "peak MiB above weights", ".0f")],
    "fullrun": [("total_s", "wall s", ".1f"), ("phases", "phases (summary.json seconds)", ""),
                ("wchar_gib", "GiB written (wchar)", ".2f"), ("write_bytes_gib", "GiB to storage", ".2f"),
                ("run_folder_gib", "run folder GiB", ".2f"), ("peak_gib", "peak GiB", ".2f"),
                ("weights_gib", "weights GiB", ".2f"), ("write_s", "s", ".1f"), ("reached_step", "reached step", "d"),
                ("files", "files (MiB)", "")],
    "variants": [("ms", "ms", ".2f"), ("vs_baseline", "vs baseline", ".3f"), ("first_call_s", "1st call s", ".1f"),
                 ("first_step_s", "1st step s", ".1f")],
}


def ok_items(data: dict, section: str) -> dict:
    items = data.get("sections", {}).get(section, {}).get("items", {})
    return {k: v for k, v in items.items() if v.get("status") == "ok"}


def targets(data: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured, or a dry run)."""
    out = []

    def add(name, goal, value, met):
        out.append({"target": name, "goal": goal, "value": value,
                    "met": None if data.get("dry_run") or met is None else bool(met)})

    full = {k: v for k, v in ok_items(data, "train").items() if "LoRA" not in k}
    mfu = {k: v["mfu_pct"] for k, v in full.items() if v.get("mfu_pct") is not None}
    best = max(mfu, key=mfu.get) if mfu else None
    add("train step MFU, bf16", ">= 45 %", f"{mfu[best]:.1f} % ({best})" if best else "not measured",
        mfu[best] >= 45 if best else None)
    peaks = {k: v["peak_gib"] for k, v in full.items() if v.get("peak_gib") is not None}
    low = min(peaks, key=peaks.get) if peaks else None
    add("peak memory, batch-1 step, reference resident", "<= 24 GB (max_memory_allocated, 24e9 bytes)",
        f"{peaks[low] * GiB / 1e9:.1f} GB ({low})" if low else "not measured",
        peaks[low] * GiB <= 24e9 if low else None)

    s = ok_items(data, "sample")
    pairs = [(m, s[f"tinyrpo {m}"]["s_per_image"], s.get(f"diffusers {m}", {}).get("s_per_image"))
             for m in ("eager", "compiled") if f"tinyrpo {m}" in s]
    if pairs:
        m, ours, theirs = min(pairs, key=lambda p: p[1])
        vs = f" vs diffusers {theirs:.3f} s" if theirs else " (diffusers not measured)"
        add("512 px 50-step sample", "<= 0.8 s and faster than diffusers", f"{ours:.3f} s ({m}){vs}",
            ours <= 0.8 and theirs is not None and ours < theirs)
    else:
        add("512 px 50-step sample", "<= 0.8 s and faster than diffusers", "not measured", None)

    run = ok_items(data, "fullrun").get("default RPO run")
    add("full default run", "< 180 s", f"{run['total_s']:.0f} s" if run else "not measured",
        run["total_s"] < 180 if run else None)
    return out


def _fmt(v, f) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x, '.1f' if isinstance(x, float) else '')}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(map(str, v))
    try:
        return format(v, f)
    except (TypeError, ValueError):
        return str(v)


def table(items: dict, columns: list) -> list[str]:
    cols = [c for c in columns if any(c[0] in i for i in items.values())]
    lines = ["| item | status | " + " | ".join(h for _, h, _ in cols) + " | note |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for name, i in items.items():
        note = i.get("error") or i.get("why") or ""
        lines.append(f"| {name} | {i.get('status')} | " + " | ".join(_fmt(i.get(k), f) for k, _, f in cols)
                     + f" | {note.replace('|', '/').splitlines()[0] if note else ''} |")
    return lines


def _derived(name: str, entry: dict) -> dict:
    """Columns computed from other items: sample's ratio to diffusers, the full run's phases and files."""
    items = {k: dict(v) for k, v in entry.get("items", {}).items()}
    if name == "sample":
        for k, v in items.items():
            mode = k.split(" ", 1)[-1]
            theirs = items.get(f"diffusers {mode}", {}).get("s_per_image")
            if k.startswith("tinyrpo") and v.get("s_per_image") and theirs:
                v["vs_diffusers"] = v["s_per_image"] / theirs
    if name == "fullrun":
        for v in items.values():
            if "phases_s" in v:
                v["phases"] = v.pop("phases_s")
            if "top_level_files_mib" in v:
                v["files"] = v.pop("top_level_files_mib")
    return items


def render(data: dict, brief: bool = False) -> str:
    """report.md; brief: the header, the targets and one status line per section (what the console shows)."""
    dry = data.get("dry_run")
    m = data.get("sections", {}).get("machine", {}).get("info", {})
    gpu = m.get("gpu") or f"CPU ({m.get('cpu_count', '?')} cores)"
    lines = [f"# tinyrpo on {gpu}{' — DRY RUN (tiny sizes: checks the code, not the GPU)' if dry else ''}", "",
             f"- command: `{data.get('command')}` at commit {data.get('commit')}",
             f"- torch {m.get('torch', '?')}, Triton {m.get('triton')}, CUDA {m.get('cuda')}, diffusers "
             f"{m.get('diffusers')}, transformers {m.get('transformers')}, Python {m.get('python', '?')}; compile "
             f"backend {data.get('compile_backend')}",
             f"- started {data.get('started')}, finished {data.get('finished', '(still running)')}, "
             f"{data.get('elapsed_s', '?')} s of a {data.get('deadline_s'):.0f} s deadline"
             + (f"; INTERRUPTED ({data['interrupted']})" if data.get("interrupted") else ""), "",
             "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in data.get("targets", []):
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**NO**")
        lines.append(f"| {t['target']} | {t['goal']} | {t['value']} | {met} |")
    lines.append("")
    if brief:
        for name, e in data.get("sections", {}).items():
            counts = {}
            for i in e.get("items", {}).values():
                counts[i.get("status")] = counts.get(i.get("status"), 0) + 1
            lines.append(f"- {name}: {e.get('status')} in {e.get('seconds', '?')} s of {e.get('budget_s', '?')}; items "
                         + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(lines) + "\n"
    for name, e in data.get("sections", {}).items():
        lines += [f"## {TITLES.get(name, name)}", "",
                  f"Status: {e.get('status')}, {e.get('seconds', '?')} s (budget {e.get('budget_s', '?')} s).", ""]
        info = e.get("info", {})
        if info:
            lines += ["- " + "; ".join(f"{k}: {_fmt(v, '.4g' if isinstance(v, float) else '')}"
                                       for k, v in info.items()), ""]
        items = _derived(name, e)
        if name == "sample" and items.get("images agree", {}).get("status") == "ok":
            pairs = items.pop("images agree").get("pairs", {})
            agree = [f"- {k}: max |Δ| {v['max_255']:.2f}/255, mean {v['mean_255']:.3f}/255: "
                     f"{'agree' if v['agree'] else '**differ**'}" for k, v in pairs.items()]
        else:
            agree = []
        if items:
            lines += table(items, COLUMNS.get(name, [])) + [""]
        lines += agree + ([""] if agree else [])
        lines += [f"- {n}" for n in e.get("notes", [])] + ([""] if e.get("notes") else [])
    return "\n".join(lines) + "\n"
