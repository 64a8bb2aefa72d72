"""Scale-out measurement for ``mmcontour bench --scaleout N``: training throughput of N CPU processes
under ``torchrun`` (gloo, DistributedDataParallel) against one process; each process plays the part of
one GPU. ``python -m MMContourLib.bench.scaleout ...`` is one such process (started by ``bench_scaleout``)."""
from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .presets import NOTES, PRESETS, Preset, med


def scaleout_worker(args) -> None:
    """One torchrun process: the product's training step (``training.step``) of the preset's model
    under DistributedDataParallel on the CPU (gloo)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from ..model.network import NetworkConfig, TextConditionedUNet
    from ..model.text import TextEncoderSpec, build_text_encoder
    from ..training.step import TrainableModel, TrainStep, adamw

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))  # a lost peer fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, args.threads))
    preset = replace(PRESETS[args.preset](), train_patch=tuple(args.patch), train_batch=args.batch)
    text = build_text_encoder(TextEncoderSpec(source=args.llm), device="cpu", dtype="fp32")
    torch.manual_seed(0)
    trainable = TrainableModel(TextConditionedUNet(NetworkConfig(feature_size=preset.feature_size, text_dim=text.dim)),
                               text)
    trainable.train()
    model = nn.parallel.DistributedDataParallel(trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, adamw(trainable), torch.device("cpu"))
    b = preset.train_batch
    gen = torch.Generator().manual_seed(rank)
    x = torch.rand(b, 1, *preset.train_patch, generator=gen)
    y = (torch.rand(b, 1, *preset.train_patch, generator=gen) > 0.7).float()
    prompts = [NOTES[(rank * b + i) % len(NOTES)] for i in range(b)]
    times, comm = [], []
    for i in range(args.steps + 1):
        dist.barrier()
        t = time.perf_counter()
        step(x, y, prompts)
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    for _ in range(3):  # the all-reduce alone, for the share of a step it takes
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(grads)
        comm.append(time.perf_counter() - t)
    if rank == 0:
        result = {"world_size": world, "threads_per_process": torch.get_num_threads(), "batch_per_process": b,
                  "patch": list(preset.train_patch), "step_s": med(times),
                  "inputs_per_s": round(world * b / statistics.median(times), 4),
                  "gradient_bytes_per_step": int(grads.numel() * grads.element_size()),
                  "trainable_parameters": int(grads.numel()), "allreduce_s": med(comm)}
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()  # leave together
    # gloo's teardown at interpreter exit sometimes hangs one process once its peer has gone (seen in
    # fresh clones); the result is written, so end the process without the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def bench_scaleout(preset: Preset, llm: Path, nprocs: int, steps: int, say, threads: int = 1,
                   timeout_s: float = 3600) -> dict:
    """Training throughput of ``nprocs`` CPU processes (torchrun, gloo) against one process, each
    process with ``threads`` threads: a process plays the part of one GPU, so the ideal ratio is N
    when the machine has N x ``threads`` idle cores."""
    results = {}
    cores = os.cpu_count() or 1
    for n in sorted({1, nprocs}):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   "-m", "MMContourLib.bench.scaleout", "--preset", preset.name, "--llm", str(llm),
                   "--steps", str(steps), "--threads", str(threads), "--out", str(out),
                   "--patch", *map(str, preset.train_patch), "--batch", str(preset.train_batch)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            say(f"scale-out: {n} process(es) x {threads} thread(s)")
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired as exc:
                return {"error": f"torchrun with {n} processes did not finish in {timeout_s:.0f} s: "
                                 f"{(exc.stderr or b'')[-2000:]!r}"}
            if proc.returncode or not out.exists():
                return {"error": f"torchrun with {n} processes failed: {proc.stderr.strip()[-2000:]}"}
            results[n] = json.loads(out.read_text())
    one, many = results[1], results[nprocs]
    return {"processes": nprocs, "cores": cores, "threads_per_process": threads, "one_process": one, "n_processes": many,
            "throughput_ratio": round(many["inputs_per_s"] / one["inputs_per_s"], 3),
            "ideal_ratio": nprocs, "efficiency": round(many["inputs_per_s"] / one["inputs_per_s"] / nprocs, 3),
            "gradient_mib_per_step": round(many["gradient_bytes_per_step"] / 2**20, 2)}


def _worker_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--preset", required=True)
    p.add_argument("--llm", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--patch", type=int, nargs=3, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--out", required=True)
    scaleout_worker(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
