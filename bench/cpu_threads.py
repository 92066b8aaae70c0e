"""The demo's CPU thread count on a busy machine: iterations of a tiny UNet's training step with every core's
thread against `addsr_pl.demo.thread_count`'s choice, while `--busy` other processes each keep one core busy.

    python bench/cpu_threads.py --busy 1        # prints the ratio of the two times

Each timing runs in a fresh process (a thread pool, once started, keeps its size), the busy processes start
first and run throughout, and both settings run in the same invocation, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"

STEP = """
import json, time, torch
from diffusers import UNet2DModel
torch.set_num_threads({threads})
torch.manual_seed(0)
unet = UNet2DModel(in_channels=48, out_channels=48, block_out_channels=(64, 128), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=8)
optimizer = torch.optim.Adam(unet.parameters(), 1e-4)
x = torch.randn(8, 48, 16, 16)
def step():
    loss = unet(x, 10).sample.square().mean()
    optimizer.zero_grad(); loss.backward(); optimizer.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range({iterations}):
    step()
print(json.dumps({{"threads": torch.get_num_threads(), "s_per_iteration": (time.perf_counter() - start) / {iterations}}}))
"""


def timed(threads: int, iterations: int) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP.format(threads=threads, iterations=iterations)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--busy", type=int, default=1, help="other processes keeping one core busy each")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=600)]) for _ in range(args.busy)]
    try:
        time.sleep(5)  # the load average sees the busy processes (the demo reads it at start)
        from addsr_pl.demo import thread_count

        chosen = thread_count(None)
        every = timed(cores, args.iterations)
        ours = timed(chosen, args.iterations)
    finally:
        for process in busy:
            process.kill()
    ratio = every["s_per_iteration"] / ours["s_per_iteration"]
    print(json.dumps({"cores": cores, "busy": args.busy, "every_core": every, "thread_count": ours,
                      "every_core_over_thread_count": round(ratio, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
