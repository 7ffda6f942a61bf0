"""Every tunable number of the cost model in one frozen dataclass, so that a profiler can
fit them from measurements and hand a new instance to the estimator."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Coefficients:
    """Constants of the analytical time model (sources in `rlhfc.planner.cost.model`); memory
    is priced from the runtime's fitted bytes (`rlhfc.planner.cost.memory`)."""

    # Bytes per token of every data key moved between calls (ids, logprobs, values).
    key_bytes_per_token: int = 4
    # Correction of the device's `achievable` share of peak FLOP/s, fitted by `rlhfc calibrate`.
    compute_efficiency: float = 1.0
    # Forward-only passes (inference, prefill) reach this multiple of the train FLOP rate.
    inference_efficiency: float = 1.0
    # Share of the link / HBM bandwidth that collectives and kernels reach.
    link_efficiency: float = 0.7
    mem_bandwidth_efficiency: float = 0.7
    # Latency of one collective (all-reduce launch and sync), seconds.
    collective_latency: float = 10e-6
    # Fixed cost of one micro-batch step on one pipeline stage (kernel launches), seconds.
    micro_batch_overhead: float = 2e-3
    # Fixed cost of one decoding step of one micro-batch on one stage, seconds.
    decode_step_overhead: float = 30e-6
    # Fixed cost per decoder layer of one decoding step of one micro-batch on one stage
    # (its kernel launches and small-batch kernels), seconds.
    decode_layer_overhead: float = 0.0
    # vLLM's prefill and decode (`rlhfc.planner.cost.engine.decode_terms`): the shares of
    # the device's peak FLOP/s and memory bandwidth its kernels reach, and its fixed cost
    # per engine step (scheduler, sampling, launches), seconds. Fitted by `rlhfc calibrate`
    # from runs with `engine = "vllm"`; the GPU values are `VLLM_GPU`'s.
    engine_compute_efficiency: float = 1.0
    engine_bandwidth_efficiency: float = 0.7
    engine_step_overhead: float = 1e-3
    # Reallocation moves parameters in buckets of `realloc_bucket_bytes` per destination
    # device, each paying `realloc_bucket_latency` seconds (launch, sync, copy-in/out).
    realloc_bucket_bytes: int = 1 << 28
    realloc_bucket_latency: float = 0.0
    # Fixed cost of one data move: a key going from its producer's layout to a consumer's
    # other layout (the runtime broadcasts the key's shapes, then sends the rows), seconds;
    # 0 leaves it out. `rlhfc calibrate` sets it to the runs' median measured move.
    move_latency: float = 0.0
    # Driver work per iteration op that the schedule does not price (a data load, a move
    # between meshes, a rule reward, a dropped copy), seconds; 0 leaves it out. Fitted by
    # `rlhfc.planner.cost.fit.fit_driver_overhead` from iteration times; not used by the solver.
    driver_op_overhead: float = 0.0
    # Time unit of the solver: durations are rounded up to whole microseconds.
    time_unit: float = 1e-6


DEFAULT_COEFFICIENTS = Coefficients()


def default_coefficients(device: str) -> Coefficients:
    """The coefficients a device is priced with when none are given: fitted ones for the
    GPUs (`GPU_COEFFICIENTS`), the analytical defaults elsewhere (`cpu`, whose runs
    `rlhfc calibrate` fits)."""
    return GPU_COEFFICIENTS.get(device, DEFAULT_COEFFICIENTS)


def estimate_meaning(device: str, given: Coefficients | None) -> str:
    """What an estimate priced with `given` (None: the device's defaults) stands for."""
    if given is not None:
        return "with the given coefficients"
    if device in GPU_COEFFICIENTS:
        return "what a well-built runtime measures: coefficients fitted to ReaL's measured H100 PPO iterations"
    return "analytical defaults; `rlhfc calibrate` fits them to this machine's runs"


# vLLM's decode on GPUs, fitted to published figures of others, not to our measurements
# (no GPU run of the engine exists yet; `bench/results/vllm_gpu_defaults.md` has the
# arithmetic): Llama-3.1-8B-Instruct in 16-bit at one request at a time, where a decode
# step reads the weights (16.06 GB) and a little KV once, t = bytes / (bandwidth · e) + o:
# - H100-80GB-HBM3, vLLM 0.21.0: median TPOT 6.48 ms (InferenceBench concurrency sweep,
#   https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/, chatbot-short; its
#   context taken as 256 tokens);
# - A100-SXM4-40GB, vLLM 0.23.0: about 75 tokens/s, 13.3 ms a step, at 1024 prompt + 128
#   output tokens (J. Musgrave, "vLLM throughput-latency sweep on NVIDIA A100",
#   https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on).
# Two steps, two unknowns: e = 0.819, o = 0.62 ms. vLLM's compute share is not fitted (no
# published compute-bound figure with its setup found): 1.0, the catalog's `achievable`.
VLLM_GPU = dict(engine_bandwidth_efficiency=0.8194, engine_step_overhead=6.17e-4, engine_compute_efficiency=1.0)

# Fitted by `bench/fit_real.py` to ReaL's measured seconds per PPO iteration on H100s
# (Mei et al. 2024; `bench/data/real_measured.json` has the figures and their source):
# rlhfc's plan against ReaL's searched plan, rlhfc's symmetric plan against ReaL's
# symmetric heuristic, 12 settings (errors in `bench/results/real_fit.md`). An estimate
# with them is what a well-built runtime measures, not the physical floor. The vLLM
# engine's coefficients are `VLLM_GPU`'s.
H100_COEFFICIENTS = replace(
    DEFAULT_COEFFICIENTS,
    collective_latency=0.0004019338234467851,
    compute_efficiency=0.33,
    decode_layer_overhead=0.0003535890512140754,
    decode_step_overhead=0.0014235656327281105,
    inference_efficiency=0.514807072710308,
    mem_bandwidth_efficiency=0.42841865984230526,
    micro_batch_overhead=0.01029924953766177,
    realloc_bucket_latency=0.04570465667739896,
    **VLLM_GPU,
)

# The other GPUs reuse the H100 fit: its efficiencies are fractions of each device's own
# peak FLOP/s and bandwidth (the catalog's figures), its fixed costs software latencies
# of the same runtime on either generation. An assumption, not a measurement.
GPU_COEFFICIENTS: dict[str, Coefficients] = {
    name: H100_COEFFICIENTS for name in ("H100-80GB", "H200", "A100-80GB", "A100-40GB")
}
