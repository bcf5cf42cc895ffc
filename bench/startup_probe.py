"""Where a fresh process's start goes before the first training step: imports or the CUDA context.

    python bench/startup_probe.py plain           # import torch, then transformers' GPT-2, then the first CUDA call
    python bench/startup_probe.py torch-thread    # the first CUDA call on a thread while transformers imports (the stage's way)
    python bench/startup_probe.py driver-thread   # cuInit + the primary context through the driver API on a thread, first thing

Prints one line of seconds per phase. Run each mode in its own process (and twice: the first run
after a machine starts also reads the files from disk).
"""

import ctypes
import sys
import threading
import time

MODES = ("plain", "torch-thread", "driver-first", "driver-thread")


def main(mode: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"mode {mode!r}: use one of {', '.join(MODES)}")
    start = time.perf_counter()
    marks: dict[str, float] = {}

    def driver_init() -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        t = time.perf_counter()
        lib.cuInit(0)
        marks["cuInit"] = time.perf_counter() - t
        device, context = ctypes.c_int(), ctypes.c_void_p()
        lib.cuDeviceGet(ctypes.byref(device), 0)
        t = time.perf_counter()
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)
        marks["primary_context"] = time.perf_counter() - t

    if mode == "driver-first":
        driver_init()
    elif mode == "driver-thread":
        threading.Thread(target=driver_init).start()
    t = time.perf_counter()
    import torch

    marks["import_torch"] = time.perf_counter() - t
    if mode == "torch-thread":
        threading.Thread(target=torch.zeros, args=(1,), kwargs={"device": "cuda"}).start()
    t = time.perf_counter()
    from transformers import GPT2LMHeadModel  # noqa: F401  (the stage's model import)

    marks["import_gpt2"] = time.perf_counter() - t
    t = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    marks["first_cuda_call_wait"] = time.perf_counter() - t
    marks["cuda_ready_at"] = time.perf_counter() - start
    print(mode.ljust(14), " ".join(f"{k} {v:.2f}" for k, v in marks.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "plain")
