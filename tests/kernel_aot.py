"""Compile Triton kernels ahead of time for GPUs that are not here (sm_90, sm_80): the engine behind
tests/test_kernels_compile.py, which holds the registry of kernels and their launch arguments.

How: Triton's JIT asks its active driver for three things before it compiles (the target, the device, the
stream). `AOTDriver` answers them, and each kernel's `.warmup(*args, grid=(1,), **meta)` runs with the arguments
its launcher passes at Phi-3-mini's shapes: torch dtypes stand in for tensors (a 16-byte-aligned pointer, as torch
allocates), ints are the launcher's real values, so the JIT specializes as a real launch would. It lowers to PTX
and runs the wheel's ptxas to a cubin; nothing is launched. Registers, spills and "wgmma serialized" warnings come
from ptxas -v (TRITON_DUMP_PTXAS_LOG=1 makes Triton print its own ptxas run's log); shared memory is the
compiled kernel's metadata.shared (the dynamic shared memory a launch requests).

Compiles run in worker subprocesses (`python tests/kernel_aot.py TASKS.json OUT.json`), a batch each, so the
LLVM/ptxas memory of one batch is gone before the next; results are cached per task under
~/.cache/phi3lora/kernel-aot, keyed by the kernel module's source, kernels/_triton.py, the registry entry's
case builder (its source and the shape constants), this file and the Triton version: an edit to any recompiles.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {90: 232448, 80: 166912}  # capability -> max dynamic shared memory per block (opt-in), bytes
SMS = {90: 132, 80: 108}               # SMs (H100/H200 SXM, A100): the rmsnorm backward launcher reads it
REGS_PER_SM = 65536
CACHE_DIR = Path(os.environ.get("PHI3LORA_CACHE", Path.home() / ".cache" / "phi3lora")) / "kernel-aot"


# ----------------------------------------------------------------------------------------------------------------
# Worker side: compile
# ----------------------------------------------------------------------------------------------------------------

class AOTDriver:
    """Stands in for Triton's CUDA driver: warmup only asks it for the target, the device and the stream."""

    def __init__(self, cap):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", cap, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one device id per target: each target gets its own JIT cache entry

    def get_current_stream(self, device=None):
        return 0


def _first_lines(e, n=6):
    return "\n".join(str(e).strip().splitlines()[:n])


def _fold(row, kernel, log, cap):
    """Fold one compiled binary (one shape of a case) into row: the worst case over the shapes."""
    md, ptx = kernel.metadata, kernel.asm["ptx"]
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs:
        row["regs"] = max(row["regs"] or 0, int(regs.group(1)))
    if spill:
        row["spill_store"] = max(row["spill_store"], int(spill.group(1)))
        row["spill_load"] = max(row["spill_load"], int(spill.group(2)))
    row["shared"] = max(row["shared"], md.shared)
    row["warps"], row["stages"] = md.num_warps, md.num_stages
    row["serial"] = sorted(set(row["serial"]) | {w.strip() for w in re.findall(
        r"wgmma.mma_async instructions are serialized due to ([^\n'.]+)", log)})
    row["fma_f32"] = max(row.get("fma_f32", 0), len(re.findall(r"\bfma\.rn\.f32\b", ptx)))  # fused multiply-adds
    row["mma"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx
                  else "fma" if "tt.dot" in kernel.asm["ttir"] else "-")


def _fits(row, cap):
    threads = 32 * row["warps"]
    regs_ok = row["regs"] is None or -(-row["regs"] // 8) * 8 * threads <= REGS_PER_SM
    return not row["err"] and row["shared"] <= SMEM_LIMIT[cap] and regs_ok and threads <= 1024


def _cpu_seconds():
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def compile_task(entry, task):
    """One (kernel, config, dtype, target, case): compile each of the case's shapes. Returns a result row."""
    from triton.runtime.driver import driver
    from triton.runtime.errors import OutOfResources

    cap = task["cap"]
    driver.set_active(AOTDriver(cap))
    cfg = entry.configs(task["dtype"])[task["cfg"]]
    shapes = entry.cases(task["dtype"], cap)[task["case"]]
    row = dict(task, err=None, oor=False, regs=None, spill_store=0, spill_load=0, shared=0, serial=[], mma="",
               warps=0, stages=0, seconds=0.0, cpu_seconds=0.0)
    start, cpu_start, seen = time.perf_counter(), _cpu_seconds(), set()
    for args, kw in shapes:
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                k = entry.jit.warmup(*args, grid=(1,), **kw, **(cfg.all_kwargs() if cfg else {}))
        except OutOfResources as e:
            row.update(err=f"OutOfResources: {_first_lines(e)}", oor=True)
            break
        except Exception as e:  # noqa: BLE001 - any compile error is a result here; the test decides
            row.update(err=f"{type(e).__name__}: {_first_lines(e)}")
            break
        if id(k) not in seen:  # a shape that specialized like an earlier one got the cached binary back
            seen.add(id(k))
            _fold(row, k, log.getvalue(), cap)
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 2)  # this process + ptxas: what idle cores would take
    row["fits"] = _fits(row, cap)
    return row


def _load_registry(path):
    spec = importlib.util.spec_from_file_location("_aot_registry", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def worker_main(tasks_path, out_path):
    os.environ.pop("TRITON_INTERPRET", None)  # the real @triton.jit, not the interpreter (read at import)
    start = _cpu_seconds()
    tasks = json.loads(Path(tasks_path).read_text())
    registry = _load_registry(tasks[0]["registry"])
    entries = {e.kernel: e for e in registry.CASES}
    for e in entries.values():  # import the kernel modules (torch, triton) before the first task's clock starts
        importlib.import_module(e.module)
    startup = _cpu_seconds() - start
    rows = [compile_task(entries[t["kernel"]], t) for t in tasks]
    for row in rows:  # the worker's start-up, shared among its tasks
        row["cpu_seconds"] = round(row["cpu_seconds"] + startup / len(rows), 2)
    Path(out_path).write_text(json.dumps(rows))


# ----------------------------------------------------------------------------------------------------------------
# Parent side: cache, batches, subprocesses
# ----------------------------------------------------------------------------------------------------------------

def _file_text(path):
    return Path(path).read_text() if Path(path).exists() else ""


def task_key(task, module_file, triton_version):
    """A cache key that changes when anything that shapes the compile does."""
    h = hashlib.sha256()
    # every kernels/*.py, not only the kernel's own module: device functions and launch options live in others
    # (nf4_lora's GEMM inlines nf4_dequant.decode_nf4 and takes nf4_dequant.EXACT_DECODE)
    sources = "".join(_file_text(p) for p in sorted((ROOT / "phi3lora" / "kernels").glob("*.py")))
    for part in (_file_text(module_file), sources, task.get("builder", ""),
                 _file_text(__file__), triton_version,
                 json.dumps({k: task[k] for k in ("kernel", "cfg", "cfg_label", "dtype", "cap", "case")})):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def run_tasks(tasks, module_files, workers=2, batch_size=8, timeout=900, use_cache=True):
    """Compile tasks (dicts with registry, kernel, cfg, cfg_label, dtype, cap, case), cached; returns rows in order.

    module_files: kernel name -> its module's source path (for the cache key). Uncached tasks run in up to
    `workers` subprocesses at a time, `batch_size` tasks each.
    """
    import triton
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    keys = [task_key(t, module_files[t["kernel"]], triton.__version__) for t in tasks]
    rows = [None] * len(tasks)
    todo = []
    for i, key in enumerate(keys):
        hit = CACHE_DIR / f"{key}.json"
        if use_cache and hit.exists():
            rows[i] = dict(json.loads(hit.read_text()), cached=True)
        else:
            todo.append(i)
    # slow tasks first (bigger tiles), so the last batch is not the one that takes minutes
    todo.sort(key=lambda i: -tasks[i].get("cost", 0))
    batches = [todo[j::max(1, -(-len(todo) // batch_size))] for j in range(max(1, -(-len(todo) // batch_size)))]
    batches = [b for b in batches if b]

    def run_batch(batch):
        with tempfile.TemporaryDirectory(prefix="kernel-aot-") as tmp:
            tasks_path, out_path = Path(tmp) / "tasks.json", Path(tmp) / "rows.json"
            tasks_path.write_text(json.dumps([tasks[i] for i in batch]))
            env = dict(os.environ, TRITON_CACHE_DIR=str(Path(tmp) / "triton-cache"), TRITON_DUMP_PTXAS_LOG="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            env.pop("TRITON_INTERPRET", None)
            env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns without it; fusion on, as launches do
            proc = subprocess.run([sys.executable, __file__, str(tasks_path), str(out_path)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
            if proc.returncode or not out_path.exists():
                raise RuntimeError(f"kernel-aot worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            return batch, json.loads(out_path.read_text())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch, got in pool.map(run_batch, batches):
            for i, row in zip(batch, got):
                rows[i] = dict(row, cached=False)
                (CACHE_DIR / f"{keys[i]}.json").write_text(json.dumps(row))
    return rows


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
