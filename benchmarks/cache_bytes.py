"""Decode cache bytes per sequence of every family's 29m config at 8K and 64K tokens, measured
from the real decode cache objects (``pretrain.models.decode``), next to the account.

Run:  python benchmarks/cache_bytes.py --out docs/results/cache_bytes.json   (PNG next to it;
a few minutes on 2 CPU cores, most of it the real 8K decodes)

Per family (``configs/<family>-29m.yaml``), one sequence, bf16 cached activations (as under
bf16 autocast) and fp32 recurrent states (SSM scan state, summary sums, workspace slots, MoE
routing logits):

1. real: the model (fp32 weights, on the CPU) decodes ``--real-context`` tokens through its
   cache: a prompt of N - 4 tokens in one call, then 4 tokens one at a time; the bytes are the
   sum of ``numel * element_size`` over the cache's tensors (``DecodeCache.nbytes``).
2. sized: ``new_decode_cache(model, 1, N, device="meta")``: the same state objects, built by
   each path's ``decode_state`` sized as after N tokens, without decoding them (no memory: a
   64K decode of five models is too slow for a CPU). At the real context their shapes must equal
   the real cache's, tensor for tensor (the run fails otherwise; ``tests/pretrain/
   test_generate.py`` checks it after every token on the tiny configs). The 8K and 64K figures
   are these, in bf16.
3. account: ``pretrain.models.cache.inference_cache_bytes`` (what ``hydra-pretrain params``
   prints); "agrees" says measured == account, per path.

Bytes per token = bytes / context. A Transformer's keys and values grow with the context; the
SSM and workspace states are fixed; sparse global attention keeps a window and n_global chunk
summaries (bounded); Attamba keeps one boundary key/value per chunk of P tokens (grows, P-fold
slower); Dreamer keeps R + prelude + coda full KV caches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from benchmarks._figures import save_figure  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.models import CausalLM, build_model  # noqa: E402
from pretrain.models.cache import inference_cache_bytes  # noqa: E402
from pretrain.models.decode import DecodeCache, new_decode_cache, tensor_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("hydra", "transformer", "mamba2", "attamba", "dreamer")
FULL = {name: (f"configs/{name}-29m.yaml", ()) for name in FAMILIES}
_TINY_WIDTHS = ("model.d_model=64", "model.n_layers=2", "model.vocab_size=128")
QUICK = {  # --quick: the tiny configs, for the smoke test
    "hydra": ("configs/hydra-tiny.yaml", ()),
    "transformer": (
        "configs/transformer-29m.yaml",
        (*_TINY_WIDTHS, "model.d_ff=128", "model.attention.n_heads=4"),
    ),
    "mamba2": (
        "configs/mamba2-29m.yaml",
        (*_TINY_WIDTHS, "model.ssm.d_state=16", "model.ssm.head_dim=16", "model.ssm.chunk_size=32"),
    ),
    "attamba": ("configs/attamba-tiny.yaml", ()),
    "dreamer": ("configs/dreamer-tiny.yaml", ()),
}
TABLE_CONTEXTS = (8192, 65536)
PLOT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
STEPS = 4  # tokens decoded one at a time after the prompt of the real decode


def real_cache(model: CausalLM, context: int, seed: int = 0) -> tuple[DecodeCache, float, float]:
    """Decode ``context`` random tokens (prompt, then ``STEPS`` single tokens) -> (cache,
    prompt seconds, milliseconds per single-token step)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), generator=gen)
    cache = new_decode_cache(model, 1)
    with torch.no_grad():
        start = time.perf_counter()
        model(ids[:, : context - STEPS], cache=cache)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for n in range(context - STEPS, context):
            model(ids[:, n : n + 1], cache=cache)
        step_ms = (time.perf_counter() - start) / STEPS * 1e3
    return cache, prompt_s, step_ms


def same_layout(a: DecodeCache, b: DecodeCache) -> bool:
    """Whether two caches hold tensors of the same shapes, run by run and path by path."""
    if a.states.keys() != b.states.keys():
        return False
    return all(
        paths.keys() == b.states[key].keys()
        and all(tensor_shapes(s) == tensor_shapes(b.states[key][p]) for p, s in paths.items())
        for key, paths in a.states.items()
    )


def _agrees(measured: dict[str, int], account: dict[str, int]) -> bool:
    keys = set(measured) | set(account)
    return all(measured.get(k, 0) == account.get(k, 0) for k in keys)


def measure_family(
    config: str, overrides: tuple[str, ...], contexts: list[int], real_context: int
) -> dict[str, Any]:
    """Sized (bf16) and accounted bytes at ``contexts``, and the real decode at ``real_context``."""
    cfg = load_config(ROOT / config, list(overrides))
    meta = build_model(cfg.model, device="meta")
    sized = {}
    for n in contexts:
        measured = new_decode_cache(meta, 1, n, device="meta", dtype=torch.bfloat16).nbytes()
        account = inference_cache_bytes(meta, n, bytes_per_elem=2)
        sized[str(n)] = {
            "bytes": measured,
            "account": account,
            "agrees": _agrees(measured, account),
        }
    record: dict[str, Any] = {"config": config, "overrides": list(overrides), "sized": sized}
    if real_context > 0:
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        cache, prompt_s, step_ms = real_cache(model, real_context)
        layout = same_layout(cache, new_decode_cache(meta, 1, real_context, device="meta"))
        if not layout:
            raise AssertionError(
                f"{config}: the real cache after {real_context} tokens is not sized"
            )
        measured = cache.nbytes()  # fp32 weights: 4-byte activations
        account = inference_cache_bytes(model, real_context, bytes_per_elem=4)
        record["real"] = {
            "context": real_context,
            "dtype": "float32",
            "bytes": measured,
            "account": account,
            "agrees": _agrees(measured, account),
            "layout_equals_sized": layout,
            "prompt_s": round(prompt_s, 2),
            "step_ms": round(step_ms, 1),
        }
    return record


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def _size(n: int) -> str:
    """Bytes in the unit that reads best: B, KiB or MiB."""
    if n < 2**10:
        return f"{n} B"
    return f"{n / 2**10:,.1f} KiB" if n < 2**20 else f"{_mib(n)} MiB"


def table(report: dict[str, Any]) -> str:
    """Markdown table: bytes per sequence and per token at the table contexts, per family."""
    head = "| family | context | cache MiB | bytes/token | by path | = account |"
    lines = [head, "| --- | ---: | ---: | ---: | --- | :---: |"]
    for name, rec in report["families"].items():
        for n in report["settings"]["table_contexts"]:
            s = rec["sized"][str(n)]
            total = s["bytes"]["total"]
            paths = ", ".join(
                f"{k} {_size(v)}" for k, v in s["bytes"].items() if k != "total" and v
            )
            agree = "yes" if s["agrees"] else "NO"
            lines.append(
                f"| {name} | {n:,} | {_mib(total)} | {total / n:,.1f} | {paths} | {agree} |"
            )
    return "\n".join(lines)


def real_table(report: dict[str, Any]) -> str:
    """Markdown table of the real decodes: bytes, agreement with the sized cache and the account."""
    lines = [
        "| family | context | real cache MiB (fp32) | shapes = sized | = account | prompt s | step ms |",
        "| --- | ---: | ---: | :---: | :---: | ---: | ---: |",
    ]
    for name, rec in report["families"].items():
        r = rec.get("real")
        if r is None:
            continue
        lines.append(
            f"| {name} | {r['context']:,} | {_mib(r['bytes']['total'])} |"
            f" {'yes' if r['layout_equals_sized'] else 'NO'} | {'yes' if r['agrees'] else 'NO'} |"
            f" {r['prompt_s']} | {r['step_ms']} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Cache MiB per sequence against the context, every family, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rec in report["families"].items():
        xs = sorted(int(n) for n in rec["sized"])
        ys = [rec["sized"][str(n)]["bytes"]["total"] / 2**20 for n in xs]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode cache per sequence (MiB, bf16)")
    ax.set_title("Decode cache of the 29m configs (measured from the cache objects)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/results/cache_bytes.json", help="JSON path")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument(
        "--real-context",
        type=int,
        default=None,
        help="tokens of the real decode, 0 for none (default: 8192; 100 with --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--quick", action="store_true", help="tiny configs, short contexts (a smoke test)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    real_context = args.real_context
    if real_context is None:
        real_context = 100 if args.quick else 8192
    families = QUICK if args.quick else FULL
    table_contexts = [256, 1024] if args.quick else list(TABLE_CONTEXTS)
    contexts = sorted({*table_contexts, *([64, 512] if args.quick else PLOT_CONTEXTS)})
    records = {}
    for name, (config, overrides) in tqdm(families.items(), desc="families", file=sys.stderr):
        records[name] = measure_family(config, overrides, contexts, real_context)
    report = {
        "settings": {
            "contexts": contexts,
            "table_contexts": table_contexts,
            "real_context": real_context,
            "batch": 1,
            "cached_activations": "bfloat16 (sized); float32 in the real decode",
            "quick": args.quick,
        },
        "families": records,
        "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "cpu_cores": os.cpu_count()},
        "wall_s": 0.0,
    }
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(table(report))
    print()
    print(real_table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
