"""Actor classes the tests start in Ray workers (a test module itself is not importable there)."""

from __future__ import annotations

from rlhf_cluster.actors.group import Worker


class PortTakenOnce(Worker):
    """Joins a one-rank process group; on its first start another socket holds the port first (as when some
    process takes the port between `free_port` and rank 0's listen), on later starts nothing does."""

    def __init__(self, rank, world_size, master_addr, master_port, marker: str):
        import os
        import socket
        from pathlib import Path

        super().__init__(rank, world_size, master_addr, master_port)
        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            self.squatter = socket.socket()
            self.squatter.bind(("", master_port))
            self.squatter.listen()
        self.init_distributed()


def parameter_elements(scorer) -> tuple[int, int]:
    """(elements of the parameters a scorer rank holds, of the whole model), through `__ray_call__`: a ZeRO-3
    rank (`partition`) holds its shard of each parameter."""
    params = list(scorer.model.parameters())
    if scorer.partition:
        return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    n = sum(p.numel() for p in params)
    return n, n
