"""GPU soak: one ComfyUI process sampling as a server does for hours (cudagraph.OWNER's contract).

    python -m bench.soak --out DIR [--runs 100] [--cancels 10] [--steps 6] [--max-seconds S] [--quick]

Starts the real host in-process as its main.py would (tests/support/host.py: its allocator, dynamic VRAM
where main.py turns it on, main.py's progress hook that raises on Cancel), builds full-size SD1.5
and SDXL UNets with random fp16 weights, a full-copy domain and a rank-32 LoRA of each (bench/
sampling.py's Bench), then makes --runs sampling runs, each drawn at random (seeded): model, batch
1-8, one of two resolutions, full or LoRA domain, domain on (1.5) or off (0), plain or hooked
prompt (an empty HookGroup on the positive); every fifth run repeats an earlier one exactly.
Interleaved: --trainings (3) LoRA training runs with cuda_graphs on (SD1.5, 8 steps, 256 px, random latents).
--cancels of the runs are cancelled: at least 3 while the fast path captures (the host's Cancel
flag set by a layer's pre-hook during the capture: its ops raise inside it), the others by a
timer at a random moment of a random step (started at that step's progress callback, firing
within the next 50 ms: a step of these models takes tens of milliseconds, so it lands mid-run).

Reported (soak.json): per run its draw, time, captures and reuses, and for a Cancel the steps the
sampler finished after the flag was set; at the end, after the host's unload_all_models and
soft_empty_cache, CUDA's graph memory in use and free memory against their values before the
first run; whether repeated runs gave bit-identical latents. The process must not abort.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import hashlib
import json
import os
import random
import shutil
import sys
import threading
import time

# bench/sampling.py first: it sets the host's allocator as main.py picks it, before torch is imported
from bench.sampling import Bench, host_module, torch

def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


RESOLUTIONS = {"sd15": (512, 384), "sdxl": (640, 512)}


class Soak:
    def __init__(self, host, bench: Bench, steps: int, quick: bool):
        import comfy.model_management as mm
        self.host, self.bench, self.steps, self.quick, self.mm = host, bench, steps, quick, mm
        self.cudagraph = host.pack("cudagraph")
        self.sampling = host.pack("nodes.sampling.run")
        self.after_cancel: list[int] = []  # steps finished after the Cancel flag was set
        self.flagged = False
        self.arm_at: int | None = None  # a timer Cancel: the step whose callback starts the timer
        self.timer: threading.Timer | None = None

    def progress_hook(self, value, total, preview, prompt_id=None, node_id=None):
        """main.py's hook: a Cancel raises at the next step's callback."""
        if self.flagged:
            self.after_cancel.append(value)
        if self.arm_at is not None and value >= self.arm_at and self.timer is None:
            self.timer = threading.Timer(random.uniform(0.0, 0.05), self.cancel)
            self.timer.start()
        self.mm.throw_exception_if_processing_interrupted()

    def cancel(self):
        self.flagged = True
        self.mm.interrupt_current_processing(True)

    def sample(self, m: dict, draw: dict) -> torch.Tensor:
        import comfy.hooks
        c = m["conds"]
        positive = c["positive"]
        if draw["hooked"]:
            positive = [[t, {**d, "hooks": comfy.hooks.HookGroup()}] for t, d in positive]
        px = draw["px"]
        latent = {"samples": torch.zeros(draw["batch"], 4, px // 8, px // 8)}
        s = self.sampling
        terms = s.collect_terms(m[draw["domain"]], 1.5 if draw["on"] else 0.0, 0.0, 1.0, None)
        guider = s.make_guider(m["base"], positive, c["negative"], c["null"], 7.0, terms, False)
        try:
            return s.sample_like_ksampler(guider, draw["seed"], self.steps, "euler", "normal", latent, 1.0)["samples"]
        finally:
            self.host.after_node()

    def run(self, models: dict, draw: dict, cancel: str | None) -> dict:
        owner = self.cudagraph.OWNER
        captures, reuses = owner.captures, owner.reuses
        m = models[draw["model"]]
        handle = None
        self.after_cancel, self.flagged, self.arm_at, self.timer = [], False, None, None
        if cancel == "capture":
            owner.release()  # this run captures: nothing of an earlier run to reuse
            module = m["base"].model.diffusion_model.out[2]
            handle = module.register_forward_pre_hook(
                lambda mod, args: self.cancel() if capturing() and not self.flagged else None)
        elif cancel == "timer":
            self.arm_at = random.randrange(1, self.steps)
        t0 = time.perf_counter()
        row = {**draw, "cancel": cancel}
        try:
            out = self.sample(m, draw)
            row["result"] = "done"
        except self.mm.InterruptProcessingException:
            out, row["result"] = None, "cancelled"
        except Exception as e:  # reported; the soak goes on (a server would too)
            out, row["result"] = None, f"error: {type(e).__name__}: {e}"[:300]
        finally:
            if handle is not None:
                handle.remove()
            if self.timer is not None:
                self.timer.cancel()
            self.arm_at = None
            self.mm.interrupt_current_processing(False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row.update(seconds=round(time.perf_counter() - t0, 3), captures=owner.captures - captures,
                   reuses=owner.reuses - reuses, held_gib=round(owner.held() / 2**30, 3),
                   graph_used_gib=round(self.cudagraph.graph_memory(self.mm.get_torch_device()) / 2**30, 3))
        if self.flagged:
            row["steps_after_cancel"] = max(0, len(self.after_cancel) - (1 if row["result"] == "cancelled" else 0))
        return row, out

    def train(self, models: dict) -> dict:
        """A LoRA training run with cuda_graphs on: bench/training.py's lora-b8-graph case, 8 steps at
        256 px, on this soak's SD1.5 base."""
        from bench import training as bench_training
        bench_training.host = self.host
        owner = self.cudagraph.OWNER
        captures = owner.captures
        t0 = time.perf_counter()
        base = models["sd15"]["base"]
        # as the node trains: under dynamic VRAM on the host's non-dynamic copy of the base (for_training)
        model = self.host.pack("nodes.training.differentiable").for_training(base)
        try:
            row = bench_training.run_case(model, "lora-b8-graph", 64 if self.quick else 256, 8, 3, 16)
        finally:
            if model is not base:
                self.host.pack("nodes.dynamic_vram").release(model)
        return {"train": "lora-b8-graph, 8 steps, 256 px", "seconds": round(time.perf_counter() - t0, 2),
                "images_per_s": round(row["images_per_s"], 2), "captures": owner.captures - captures,
                "held_after_gib": round(owner.held() / 2**30, 3)}


def latent_sha(out: torch.Tensor) -> str:
    return hashlib.sha256(out.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def repeat_check(soak: Soak, models: dict, draw: dict, times: int, out_dir: str) -> int:
    """One draw, `times` runs per path, in this order: the stock KSampler (the domain off), the
    straightforward guider (INDOMAIN_FAST_DOMAIN=0), the fast path without graphs (eager), with graphs
    (graph; the later runs reuse the first's graphs); then the straightforward guider again. Which
    path's first run differs from its later ones, and whether the paths agree, tell where a repeat
    that is not bit-identical comes from."""
    rows = []
    for path, on, env in (("stock", False, "0"), ("straightforward", True, "0"), ("eager", True, "eager"),
                          ("graph", True, "1"), ("straightforward again", True, "0")):
        os.environ["INDOMAIN_FAST_DOMAIN"] = env
        for k in range(times):
            row, out = soak.run(models, {**draw, "on": on}, None)
            row.update(path=path, repeat=k, latent_sha=latent_sha(out) if out is not None else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.environ.pop("INDOMAIN_FAST_DOMAIN", None)
    with open(os.path.join(out_dir, "repeat_check.json"), "w") as f:
        json.dump({"draw": draw, "runs": rows}, f, indent=1)
    return 0


def memory(cudagraph) -> dict:
    """The device's free memory and who holds the rest: torch's allocator (reserved), CUDA's graph
    memory, and other (the context, loaded kernel modules, library handles and workspaces made
    outside torch's allocator, any other process on the device)."""
    if not torch.cuda.is_available():  # (--quick on the CPU: nothing to measure)
        return {"graph_used_gib": 0.0, "free_gib": 0.0, "reserved_gib": 0.0, "other_gib": 0.0}
    dev = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(dev)
    graph, reserved = cudagraph.graph_memory(dev), torch.cuda.memory_reserved(dev)
    return {"graph_used_gib": round(graph / 2**30, 3), "free_gib": round(free / 2**30, 3),
            "reserved_gib": round(reserved / 2**30, 3), "other_gib": round((total - free - graph - reserved) / 2**30, 3)}


def settled(soak: "Soak") -> dict:
    """memory() once the host has unloaded every model and emptied its caches (as after a run)."""
    gc.collect()
    soak.mm.unload_all_models()
    soak.mm.soft_empty_cache()
    return memory(soak.cudagraph)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--cancels", type=int, default=10)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--quick", action="store_true", help="tiny models (checks the script)")
    ap.add_argument("--repeat-check", default=None, metavar="JSON",
                    help='instead of the soak: one draw (e.g. {"model":"sdxl","batch":4,"px":640,"domain":"lora",'
                         '"on":true,"hooked":true,"seed":537958267}) run --repeat-times times under each path '
                         '(stock: domain off; INDOMAIN_FAST_DOMAIN=0, eager, graph) in a fresh process; the latent '
                         'hash of each run')
    ap.add_argument("--repeat-times", type=int, default=3)
    ap.add_argument("--trainings", type=int, default=3, help="LoRA training runs spread over the soak (0: sampling only)")
    ap.add_argument("--memory-every", type=int, default=0, metavar="N",
                    help="after every N-th run (and each training run) unload, empty the caches and record memory(): "
                         "where a gap in free memory appears, and whether it grows or stays")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="draw no new run after this long (the unload and the summary still come); the summary says how many ran")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import tempfile
    base_dir = tempfile.mkdtemp(prefix="indomain-soak-")  # the host's folders: model files of several GB
    atexit.register(shutil.rmtree, base_dir, ignore_errors=True)
    host = host_module.Host(host_module.find_host(), base_dir,
                            cpu=not torch.cuda.is_available(),
                            builtin_nodes=False, dynamic_vram=True).start()
    import comfy.model_management as mm
    import comfy.utils
    import comfyui_version
    comfy.utils.PROGRESS_BAR_ENABLED = False
    bench = Bench(host, args.quick, args.steps, 1, 7.0, torch.float16 if torch.cuda.is_available() else torch.float32)
    soak = Soak(host, bench, args.steps, args.quick)
    comfy.utils.set_progress_bar_global_hook(soak.progress_hook)
    models = {name: bench.build(name) for name in args.models.split(",")}
    if args.repeat_check:
        return repeat_check(soak, models, json.loads(args.repeat_check), args.repeat_times, args.out)
    rng = random.Random(args.seed)
    random.seed(args.seed)
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": mm.get_torch_device_name(mm.get_torch_device()),
                       "torch": torch.__version__, "comfyui": comfyui_version.__version__,
                       "allocator": host.allocator, "dynamic_vram": host.dynamic_vram, "steps": args.steps,
                       "runs": args.runs, "command": "python -m bench.soak " + " ".join(argv or sys.argv[1:])},
              "runs": []}
    result["before"] = settled(soak)
    cancels = rng.sample(range(1, args.runs), args.cancels)
    kinds = {i: ("capture" if n < 3 else "timer") for n, i in enumerate(cancels)}
    trainings = {args.runs * (k + 1) // (args.trainings + 1) for k in range(args.trainings)}
    draws, outputs, repeats = [], {}, []
    path = os.path.join(args.out, "soak.json")
    started = time.perf_counter()
    for i in range(args.runs):
        if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
            result["stopped_after_runs"] = i  # --max-seconds reached
            break
        if i % 5 == 4 and draws:
            j = rng.randrange(len(draws))
            draw, repeat_of = dict(draws[j]), j
        else:
            model = rng.choice(list(models))
            draw = {"model": model, "batch": 1 + rng.randrange(8), "px": rng.choice(RESOLUTIONS[model]) if not args.quick else 64,
                    "domain": rng.choice(["full", "lora"]), "on": rng.random() < 0.8, "hooked": rng.random() < 0.2,
                    "seed": rng.randrange(1 << 30)}
            repeat_of = None
        if kinds.get(i) == "capture":  # a run that captures: the domain on, no hooked prompt
            draw.update(on=True, hooked=False)
        row, out = soak.run(models, draw, kinds.get(i))
        row["run"], row["repeat_of"] = i, repeat_of
        draws.append(draw)
        if out is not None:
            outputs[i] = out
            row["latent_sha"] = latent_sha(out)
            if repeat_of is not None and repeat_of in outputs:
                row["bit_identical"] = bool(torch.equal(out, outputs[repeat_of]))
                repeats.append(row["bit_identical"])
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        if i in trainings and "sd15" in models:
            try:
                result["runs"].append(soak.train(models))
            except Exception as e:  # reported, the soak goes on
                result["runs"].append({"train": "error", "error": f"{type(e).__name__}: {e}"[:300]})
            if args.memory_every:
                result["runs"][-1]["memory"] = settled(soak)
            print(json.dumps(result["runs"][-1]), flush=True)
        if args.memory_every and (i + 1) % args.memory_every == 0:
            result.setdefault("memory_trace", []).append({"after_run": i, **settled(soak)})
            print(json.dumps(result["memory_trace"][-1]), flush=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    del models, outputs
    result["after"] = settled(soak)
    cancelled = [r for r in result["runs"] if r.get("cancel")]
    result["summary"] = {
        "runs": result.get("stopped_after_runs", args.runs), "seconds": round(time.perf_counter() - started, 1),
        "cancels": len(cancelled),
        "cancels_during_capture": sum(r["cancel"] == "capture" for r in cancelled),
        "cancelled_runs": sum(r.get("result") == "cancelled" for r in cancelled),
        "max_steps_after_cancel": max((r.get("steps_after_cancel", 0) for r in cancelled), default=0),
        "repeats": len(repeats), "repeats_bit_identical": sum(repeats),
        "graph_used_delta_gib": round(result["after"]["graph_used_gib"] - result["before"]["graph_used_gib"], 3),
        "free_delta_gib": round(result["after"]["free_gib"] - result["before"]["free_gib"], 3),
        "other_delta_gib": round(result["after"]["other_gib"] - result["before"]["other_gib"], 3),
        "reserved_delta_gib": round(result["after"]["reserved_gib"] - result["before"]["reserved_gib"], 3),
        "kept_bytes": soak.cudagraph.kept_bytes(),
        "errors": sum(str(r.get("result", "")).startswith("error") for r in result["runs"])
        + sum(r.get("train") == "error" for r in result["runs"]),
        "captures": soak.cudagraph.OWNER.captures, "reuses": soak.cudagraph.OWNER.reuses,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
