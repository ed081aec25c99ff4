#!/usr/bin/env python3
"""Speed of one SSL training step (dinocell.train.SSLMetaArch + AdamW + EMA), with the plain-PyTorch anchor.

  python bench/bench_train_step.py                          # GPU: full config (ViT-S/8, B=64, 2x224 + 8x96, 65,536
                                                            #      prototypes), bf16, eager then compiled
  python bench/bench_train_step.py --device cpu             # CPU: reduced config (the anchor's --tiny sizes), fp32
  python bench/bench_train_step.py --with-ref               # also run ../shared/bench/ref_step_bench.py in this
                                                            # command (same sizes) and print our/ref ratios
Options: --modes eager,compile,compile+ckpt  --batch B  --iters N  --warmup N  --with-augment [--masks-in-step]
         --ref PATH  --json-out F  --profile [--profile-steps N]

The timed step is the trainer's: schedules -> zero_grad -> forward-backward (teacher Sinkhorn targets, student on
all crops in one multi-crop pass, DINO + iBOT + KoLeo) -> per-part clipping -> finite check (one host sync, as the
trainer) -> AdamW step -> EMA update. Inputs are pre-generated crops and iBOT masks (3 sets, rotated), as the anchor;
--with-augment times the multi-view augmentation of uint8 fields inside the step instead (the iBOT masks still come
with the batch, built beforehand, as the trainer's DataLoader workers build them; --masks-in-step also builds them in
the step, on the training process's critical path, as the trainer did before).

FLOPs are analytic model FLOPs (matmuls only; activation-checkpoint recompute not counted), by the anchor's method:
a linear with M rows, K inputs, N outputs costs 2*M*N*K; a ViT block 24*n*T*D^2 + 4*n*T^2*D forward; backward =
2x forward except the image-facing patch embedding; the student runs forward + backward, the teacher forward only.
MFU = achieved FLOP/s / a measured dense matmul peak (bf16 8192^3 on GPU, fp32 1024^3 on CPU: only indicative there).
Prints one JSON line per mode, a summary table, and with --with-ref the anchor's lines and the ratios.
--profile: after each mode's timed iterations, --profile-steps more steps run under torch.profiler (CPU activity, plus
CUDA on a GPU; no shapes); the row gets "profile_top", the top 15 operators/kernels by self device time (CUDA) or self
CPU time (CPU) as [{name, calls, self_time_ms, total_time_ms, pct}] (times summed over the profiled steps, pct of the
total self time of all events), and a table per mode is printed after the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import Config
from dinocell.data.multiview import MultiViewAugment
from dinocell.loss import collate_masks, mask_counts
from dinocell.train.optim import apply_schedules, build_optimizer
from dinocell.train.ssl_model import LOSS_KEYS, SSLInputs, SSLMetaArch, mask_batch_to

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REF = REPO.parent / "shared" / "bench" / "ref_step_bench.py"
# the anchor's --tiny sizes (its TINY dict), for the CPU run
REDUCED = {"embed_dim": 64, "depth": 2, "num_heads": 2, "global_size": 32, "local_size": 16, "batch": 4,
           "n_prototypes": 512}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(device: torch.device, reduced: bool, batch: int | None, precision: str) -> tuple[Config, int]:
    cfg = Config()  # defaults = the seed's full run (vits8_jump)
    cfg.train.precision = precision
    cfg.model.drop_path_rate = 0.1
    if reduced:
        cfg.model.arch = "vit_small"
        cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = (REDUCED[k] for k in ("embed_dim", "depth", "num_heads"))
        cfg.model.n_prototypes = REDUCED["n_prototypes"]
        cfg.augment.global_size, cfg.augment.local_size = REDUCED["global_size"], REDUCED["local_size"]
        cfg.augment.blur_kernel_size = 5
    return cfg, batch or (REDUCED["batch"] if reduced else cfg.loader.batch_size)


# ----------------------------------------------------------------------------------------------- FLOPs


def step_flops(cfg: Config, batch: int, n_masked: int, embed_dim: int, depth: int) -> float:
    """Analytic matmul FLOPs of one training step (module docstring)."""
    m, a = cfg.model, cfg.augment
    d, p, c = embed_dim, m.patch_size, m.in_chans
    n_global, n_local = 2, a.n_local
    n_prefix = 1 + 4  # cls + 4 registers

    def embed(n, img):
        return 2 * n * (img // p) ** 2 * c * p * p * d

    def vit(n, img):
        t = (img // p) ** 2 + n_prefix
        return embed(n, img) + depth * (24 * n * t * d * d + 4 * n * t * t * d)

    def head(rows):
        h, b, k = m.head_hidden_dim, m.head_bottleneck_dim, m.n_prototypes
        mlp = d * h + (m.head_nlayers - 2) * h * h + h * b if m.head_nlayers > 1 else d * b
        return 2 * rows * (mlp + b * k)

    glob, loc = n_global * batch, n_local * batch
    student = vit(glob, a.global_size) + vit(loc, a.local_size) + head(glob + loc) + head(n_masked)
    teacher = vit(glob, a.global_size) + head(glob) + head(n_masked)
    return 3 * student - embed(glob, a.global_size) - embed(loc, a.local_size) + teacher


def matmul_peak_tflops(device: torch.device, n: int, dtype: torch.dtype, warmup: int = 3, reps: int = 10) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(warmup):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# ----------------------------------------------------------------------------------------------- the step


def make_inputs(cfg: Config, batch: int, device: torch.device, n_sets: int = 3, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    a, p = cfg.augment, cfg.model.patch_size
    grid = (a.global_size // p, a.global_size // p)
    sets = []
    for i in range(n_sets):
        glob = torch.randn(2 * batch, 1, a.global_size, a.global_size, generator=gen)
        loc = torch.randn(a.n_local * batch, 1, a.local_size, a.local_size, generator=gen)
        masks = collate_masks(2 * batch, grid, tuple(cfg.loss.mask_ratio_min_max), cfg.loss.mask_probability,
                              generator=seed + i)
        sets.append(SSLInputs(glob.to(device), loc.to(device), mask_batch_to(masks, device)))
    return sets


def make_fields(batch: int, size: int, device: torch.device, n_sets: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (batch, 5, size, size), dtype=torch.uint8, generator=gen).to(device)
            for _ in range(n_sets)]


def make_masks(cfg: Config, batch: int, n_sets: int = 3) -> list:
    """iBOT masks made with the batch (on the CPU, as in the trainer's DataLoader workers)."""
    grid = (cfg.augment.global_size // cfg.model.patch_size,) * 2
    return [collate_masks(2 * batch, grid, tuple(cfg.loss.mask_ratio_min_max), cfg.loss.mask_probability,
                          generator=i) for i in range(n_sets)]


def build_step(cfg: Config, device: torch.device, compile_: bool, checkpointing: bool, with_augment: bool,
               masks_in_step: bool = False):
    torch.manual_seed(0)
    cfg.model.activation_checkpointing = checkpointing
    meta = SSLMetaArch(cfg.model, cfg.loss, precision=cfg.train.precision).to(device).train()
    if compile_:
        meta.compile_backbones()
    opt = build_optimizer(meta.student_named_parameters(), meta.depth, cfg.optim, device)
    augment = MultiViewAugment(cfg.augment)
    aug_gen = torch.Generator(device=device).manual_seed(0)
    mask_gen = torch.Generator().manual_seed(0)
    grid = (cfg.augment.global_size // cfg.model.patch_size,) * 2
    names = list(FLUORESCENT_CHANNELS)

    def step(data) -> torch.Tensor:
        if with_augment:
            fields, masks = data
            views = augment(fields, names, aug_gen)
            if masks_in_step:
                masks = collate_masks(views.global_crops.shape[0], grid, tuple(cfg.loss.mask_ratio_min_max),
                                      cfg.loss.mask_probability, generator=mask_gen)
            data = SSLInputs(views.global_crops, views.local_crops, mask_batch_to(masks, device))
        apply_schedules(opt, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.lr)
        opt.zero_grad(set_to_none=True)
        losses = meta.forward_backward(data, cfg.loss.teacher_temp)
        norms = meta.clip_gradients(cfg.optim.clip_grad)
        stacked = torch.stack([losses[k] for k in LOSS_KEYS])
        if not bool(torch.isfinite(stacked).all() & torch.isfinite(norms).all()):  # the trainer's per-step sync
            raise FloatingPointError(f"non-finite loss {stacked.tolist()}")
        opt.step()
        meta.update_teacher(cfg.optim.momentum_teacher)
        return stacked[0]

    return step, meta


PROFILE_TOP = 15


def profile_steps(step, data, device: torch.device, n_steps: int, offset: int = 0, top: int = PROFILE_TOP) -> dict:
    """Run n_steps more steps under torch.profiler; the top operators/kernels by self device (CUDA) or CPU time."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sync(device)
    with profile(activities=activities, record_shapes=False) as prof:
        for i in range(n_steps):
            step(data[(offset + i) % len(data)])
        sync(device)
    events = prof.key_averages()

    def self_us(e) -> float:
        if on_cuda:
            return float(e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total)
        return float(e.self_cpu_time_total)

    def total_us(e) -> float:
        if on_cuda:
            return float(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
        return float(e.cpu_time_total)

    all_self = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    rows = [{"name": e.key, "calls": int(e.count), "self_time_ms": self_us(e) / 1e3, "total_time_ms": total_us(e) / 1e3,
             "pct": 100.0 * self_us(e) / all_self} for e in ranked if self_us(e) > 0]
    return {"profile_top": rows, "profile_steps": n_steps, "profile_sort": "self_device_time" if on_cuda else
            "self_cpu_time", "profile_self_total_ms": all_self / 1e3}


def print_profile(row: dict) -> None:
    top = row.get("profile_top")
    if top is None:
        if "profile_error" in row:
            print(f"\nprofile dinocell {row['mode']}: FAILED {row['profile_error'][:100]}")
        return
    print(f"\nprofile dinocell {row['mode']}: top {len(top)} by {row['profile_sort']} over {row['profile_steps']} "
          f"steps (all events' self time {row['profile_self_total_ms']:.1f} ms)")
    print(f"{'name':<60}{'calls':>7}{'self ms':>10}{'total ms':>10}{'%':>7}")
    for r in top:
        name = r["name"] if len(r["name"]) <= 58 else r["name"][:55] + "..."
        print(f"{name:<60}{r['calls']:>7}{r['self_time_ms']:>10.2f}{r['total_time_ms']:>10.2f}{r['pct']:>7.1f}")


def run_mode(args, cfg, batch, device, mode: str, peak: float) -> dict:
    compile_, ckpt = "compile" in mode, "ckpt" in mode
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step, meta = build_step(cfg, device, compile_, ckpt, args.with_augment, args.masks_in_step)
    field_size = args.field_size or (540 if cfg.augment.global_size >= 224 else 4 * cfg.augment.global_size)
    if args.with_augment:
        data = list(zip(make_fields(batch, field_size, device), make_masks(cfg, batch)))
    else:
        data = make_inputs(cfg, batch, device)
    times, losses = [], []
    t_start = time.perf_counter()
    warmup_s = None
    for it in range(args.warmup + args.iters):
        sync(device)
        t0 = time.perf_counter()
        losses.append(float(step(data[it % len(data)])))
        sync(device)
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
        elif it == args.warmup - 1:
            warmup_s = time.perf_counter() - t_start
    n_masked = sum(mask_counts(2 * batch, (cfg.augment.global_size // cfg.model.patch_size) ** 2,
                               tuple(cfg.loss.mask_ratio_min_max), cfg.loss.mask_probability))
    backbone = meta.student.backbone
    flops = step_flops(cfg, batch, n_masked, backbone.embed_dim, backbone.n_blocks)
    med = statistics.median(times)
    prof = {}
    if args.profile:
        try:
            prof = profile_steps(step, data, device, args.profile_steps, offset=args.warmup + args.iters)
        except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the timings
            prof = {"profile_error": f"{type(e).__name__}: {e}"[:2000]}
    return {
        "bench": "dinocell", "mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch, "precision": cfg.train.precision, "with_augment": args.with_augment,
        "masks_in_step": args.masks_in_step,
        "s_per_iter_median": med, "s_per_iter_min": min(times), "fields_per_s": batch / med,
        "tflop_per_iter": flops / 1e12, "achieved_tflops": flops / med / 1e12, "matmul_peak_tflops": peak,
        "mfu": flops / med / 1e12 / peak,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss_first": losses[0], "loss_last": losses[-1], "warmup_s": warmup_s, "n_masked": n_masked,
        "torch": torch.__version__, **prof,
    }


def run_ref(args, device: torch.device, batch: int, reduced: bool) -> list[dict]:
    """The anchor in a subprocess of this command (same machine, same moment); its JSON lines."""
    ref = Path(args.ref)
    if not ref.exists():
        raise SystemExit(f"--with-ref: anchor script not found at {ref} (pass --ref PATH)")
    cmd = [sys.executable, str(ref), "--batch", str(batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--device", device.type]
    if reduced:
        cmd += ["--tiny", "--dtype", "fp32" if args.precision == "fp32" else "bf16"]
    if any("compile" in m for m in args.modes) and device.type == "cuda":
        cmd += ["--sweep"]
    print("running anchor:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"anchor failed with exit code {proc.returncode}")
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "config" in row:
                rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None,
                    help="the anchor's --tiny sizes (default: on for CPU, off for GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--modes", default=None, help="comma list of eager, compile, compile+ckpt, eager+ckpt "
                    "(default: eager,compile on GPU; eager on CPU)")
    ap.add_argument("--with-augment", action="store_true", help="time the augmentation of uint8 fields in the step")
    ap.add_argument("--masks-in-step", action="store_true",
                    help="with --with-augment: also build the iBOT masks in the step (the trainer's old critical path)")
    ap.add_argument("--field-size", type=int, default=0, help="field side for --with-augment (default 540 full)")
    ap.add_argument("--with-ref", action="store_true", help="also run the plain-PyTorch anchor and print ratios")
    ap.add_argument("--ref", default=str(DEFAULT_REF), help="anchor script (default ../shared/bench/ref_step_bench.py)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json-out", default="", help="also write all result rows to this JSON file")
    ap.add_argument("--profile", action="store_true", help="after each mode's timed iterations, profile a few more "
                    f"steps with torch.profiler; top {PROFILE_TOP} ops/kernels in the row (profile_top) and a table")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps run under the profiler with --profile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reduced = args.reduced if args.reduced is not None else device.type == "cpu"
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.modes = (args.modes or ("eager,compile" if device.type == "cuda" else "eager")).split(",")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg, batch = bench_config(device, reduced, args.batch, args.precision)
    p_n, p_dt = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    peak = matmul_peak_tflops(device, p_n, p_dt)
    print(json.dumps({"matmul_peak_tflops": peak, "n": p_n, "dtype": str(p_dt)}), flush=True)

    rows = []
    for mode in args.modes:
        try:
            row = run_mode(args, cfg, batch, device, mode, peak)
        except Exception as e:  # noqa: BLE001 - one failing mode (compile error, OOM) must not hide the others
            row = {"bench": "dinocell", "mode": mode, "error": f"{type(e).__name__}: {e}"[:2000]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if "compile" in mode:
            torch._dynamo.reset()
    ref_rows = run_ref(args, device, batch, reduced) if args.with_ref else []

    print(f"\n{'run':<22}{'s/iter':>10}{'fields/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
    for r in rows + ref_rows:
        name = f"dinocell {r['mode']}" if r.get("bench") == "dinocell" else f"ref {r.get('config')}"
        if "error" in r:
            print(f"{name:<22}  FAILED {r['error'][:70]}")
            continue
        s = r.get("s_per_iter_median")
        fps = r.get("fields_per_s", r.get("img_per_s"))
        mem = r.get("peak_mem_gib")
        print(f"{name:<22}{s:>10.4f}{fps:>10.1f}{r['achieved_tflops']:>9.3g}{r['mfu']:>7.3f}"
              f"{(f'{mem:.1f}' if mem is not None else '-'):>9}")
    ratios = {}
    for r in rows:
        match = next((x for x in ref_rows if x.get("config") == r["mode"] and "error" not in x), None)
        if match and "error" not in r:
            ratios[r["mode"]] = match["s_per_iter_median"] / r["s_per_iter_median"]
            print(f"speed-up over the anchor ({r['mode']}): {ratios[r['mode']]:.2f}x "
                  f"(ref {match['s_per_iter_median']:.4f} s/it vs ours {r['s_per_iter_median']:.4f} s/it, "
                  f"ref {match['tflop_per_iter']:.3f} vs ours {r['tflop_per_iter']:.3f} TFLOP/iter)")
    print(f"(B={batch}, {args.precision}, device {device}, reduced={reduced}; ours has 1 input channel, the anchor 3)")
    if args.profile:
        for r in rows:
            print_profile(r)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "ref": ref_rows, "ratios": ratios}, indent=1))
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
