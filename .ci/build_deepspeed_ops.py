"""Build the DeepSpeed ops the tests load (shm comm, pin_memory, async_io) into TORCH_EXTENSIONS_DIR.

.ci/run starts this in the background while the tests begin: on a fresh machine the three JIT
builds take about 700 s of compiler time (400 s of wall time alone on 2 cores), and the tests
leave about a third of the CPU idle. A test that needs an op before it is ready waits on torch's
build lock; none builds twice.
"""

from __future__ import annotations

import time

from deepspeed.comm.torch import build_shm_op
from deepspeed.ops.op_builder import PinMemoryBuilder

from supermerge.distributed.comm import prefer_this_environments_tools
from supermerge.distributed.stores.nvme import aio_handle

BUILDS = {
    "deepspeed_shm_comm": build_shm_op,  # every rank of a `deepspeed`-launched job on the CPU
    "pin_memory": lambda: PinMemoryBuilder().load(),
    "async_io": aio_handle,  # distributed.offload: nvme
}


def main() -> None:
    prefer_this_environments_tools()
    for name, build in BUILDS.items():
        start = time.perf_counter()
        build()
        print(f"ci: DeepSpeed op {name} ready after {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
