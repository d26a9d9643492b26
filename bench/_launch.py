"""Run a function on W local ranks (spawned processes, gloo) and collect what each returns.

The one launcher of the benchmarks and the tests (tests/distributed.py runs it with the ranks joining through
`ltsft_dist.engine.init_distributed`). Every launch is a fresh set of processes: memory high-water marks measured
in them start clean.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback

from ltsft_dist.launch_env import free_port


def _child(fn, rank, world_size, port, threads, use_deepspeed, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
        if world_size > 1 or use_deepspeed:
            if use_deepspeed:
                from ltsft_dist.engine import init_distributed

                init_distributed()
            else:
                import torch.distributed as dist

                dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # report everything to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, world_size: int, *args, threads: int = 1, deepspeed: bool = False, timeout: float = 900) -> list:
    """`fn(*args)` on every rank; results ordered by rank, or raise with the first failing rank's traceback."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, threads, deepspeed, args, out))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = out.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout} s with {len(results)} of {world_size} ranks done")
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
