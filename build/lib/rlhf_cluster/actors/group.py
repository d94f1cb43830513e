"""ActorGroup: N ranks of one actor class in a placement group, forming one torch.distributed world.

The coordinator talks to a group, not to actors: call a method on every rank, or split a
batch evenly across the data-parallel ranks and gather the results in order.
"""

from __future__ import annotations

import os
import socket
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_cluster.lib.config import GroupResources


class Worker:
    """Base of every rank: knows its rank and world, and can join the process group."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int):
        self.rank, self.world_size = rank, world_size
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE="1")
        threads = os.environ.get("RLHF_TORCH_THREADS")
        if threads:  # on few cores, several actors each grabbing every core is slower than sharing
            import torch

            torch.set_num_threads(int(threads))

    def init_distributed(self) -> None:
        from rlhf_cluster.lib.deepspeed_setup import init_distributed

        init_distributed()

    def ping(self) -> int:
        return self.rank

    def placement(self) -> dict:
        """Where Ray put this rank: node and placement group (colocation is checked with it)."""
        ctx = ray.get_runtime_context()
        pg = ctx.get_placement_group_id()
        return {"node": ctx.get_node_id(), "placement_group": pg, "pid": os.getpid()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address_and_free_port() -> tuple[str, int]:
    """Run on a node (as a task): its address in the cluster and a port free there now."""
    return ray.util.get_node_ip_address(), free_port()


_address_task = ray.remote(num_cpus=0)(node_address_and_free_port)


def _node_id(_actor) -> str:
    return ray.get_runtime_context().get_node_id()


def split_evenly(items: list, n: int) -> list[list]:
    """n contiguous chunks whose sizes differ by at most one (order kept)."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


class ActorGroup:
    """`resources.num_ranks` actors of `cls`, each in its own bundle of one placement group.

    `max_restarts` > 0 lets Ray restart a dead rank in place (for ranks that need no peers:
    rollout engines, reference and reward replicas); `max_task_retries` then re-sends the calls
    that were in flight. DeepSpeed ranks keep the defaults (0): a lost rank breaks the process
    group, so the coordinator rebuilds the whole group with `restart()`.

    `pg`: a placement group shared with other groups (colocation, see `colocated_placement_group`):
    rank i goes into its bundle i, and the group neither creates nor removes a placement group.
    """

    def __init__(self, cls, resources: GroupResources, *args, name: str = "group",
                 env: dict[str, str] | None = None, max_restarts: int = 0, max_task_retries: int = 0,
                 wait: bool = True, pg=None, **kwargs):
        self.name, self.resources = name, resources
        self.shared_pg = pg
        self._spec = (cls, args, kwargs, env or {}, max_restarts, max_task_retries)
        self.restarts = 0  # whole-group rebuilds
        self._starts = 0  # every start, retried ones too: the actor and placement-group names stay unique
        self._start()
        if wait:
            self.wait()

    def _start(self) -> None:
        cls, args, kwargs, env, max_restarts, max_task_retries = self._spec
        resources, n = self.resources, self.resources.num_ranks
        self._starts += 1
        tag = f"{os.getpid()}-{id(self)}-{self._starts}"
        if self.shared_pg is None:
            # unique: a name still held by a group another run failed to remove would refuse this one
            self.pg = placement_group([colocated_bundle({self.name: resources})] * n, strategy=resources.placement,
                                      name=f"{self.name}-pg-{tag}")
        else:
            self.pg = self.shared_pg
        ray.get(self.pg.ready(), timeout=300)
        # rank 0 listens for its peers: an address and a free port on the node of bundle 0 (on a multi-node
        # cluster not necessarily the coordinator's)
        master_addr, master_port = ray.get(_address_task.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)).remote())
        remote_cls = ray.remote(cls)
        self.actors = [
            remote_cls.options(
                num_cpus=resources.num_cpus_per_rank,
                num_gpus=resources.num_gpus_per_rank,
                max_restarts=max_restarts,
                max_task_retries=max_task_retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env},
                name=f"{self.name}-{i}-{tag}",
            ).remote(i, n, master_addr, master_port, *args, **kwargs)
            for i in range(n)
        ]

    def wait(self, timeout: float = 600, port_retries: int = 3) -> None:
        """Block until every rank has finished starting (groups can start side by side first).

        The process group's port is one that was free when `free_port` looked; another process can take
        it before rank 0 listens on it (EADDRINUSE). Such a start is made again on a new port."""
        for attempt in range(port_retries + 1):
            try:
                ray.get([a.ping.remote() for a in self.actors], timeout=timeout)
                return
            except ray.exceptions.RayActorError as e:
                if "EADDRINUSE" not in str(e) or attempt == port_retries:
                    raise
                self.shutdown()
                self._start()

    def wait_alive(self, timeout: float = 600) -> None:
        """Wait for ranks that Ray is restarting; raises ActorDiedError for one out of restarts."""
        deadline = time.monotonic() + timeout
        for actor in self.actors:
            while True:
                try:
                    ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.ActorUnavailableError:  # restarting: its constructor runs again
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)

    def responsive(self, timeout: float) -> bool:
        """Every rank alive and answering within `timeout` s (a rank stuck in a collective with a
        dead peer does not answer)."""
        try:
            ray.get([a.ping.remote() for a in self.actors], timeout=timeout)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def restart(self) -> None:
        """Kill every rank and start the group again from its constructor arguments."""
        self.shutdown()
        self.restarts += 1
        self._start()
        self.wait()

    def nodes(self) -> list[str]:
        """The Ray node id of each rank, in rank order (any actor class)."""
        return ray.get([a.__ray_call__.remote(_node_id) for a in self.actors])

    @property
    def world_size(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args, **kwargs) -> list:
        """Call `method` with the same arguments on every rank; returns ObjectRefs."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def run(self, method: str, *args, **kwargs) -> list:
        return gather(self.call(method, *args, **kwargs))

    def split_call(self, method: str, items: list, *args, **kwargs) -> list:
        """Scatter `items` across ranks, call `method(chunk, ...)`, return ObjectRefs per rank."""
        chunks = split_evenly(items, self.world_size)
        return [getattr(a, method).remote(c, *args, **kwargs) for a, c in zip(self.actors, chunks)]

    def map(self, method: str, items: list, *args, **kwargs) -> list:
        """split_call, then gather the per-item results back in the original order."""
        return [x for part in gather(self.split_call(method, items, *args, **kwargs)) for x in part]

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except ValueError:  # already gone
                pass
        if self.shared_pg is None:  # a shared one is removed by whoever made it
            remove_placement_group(self.pg)


def colocated_placement_group(groups: dict[str, GroupResources], strategy: str = "PACK"):
    """One placement group for groups that share devices: bundle i holds what rank i of every
    group asks for (e.g. trainer 0.5 GPU + reference 0.5 GPU: both ranks on the same GPU), so
    rank i of each group lands on the same node and device. All groups have the same rank count
    (checked by the job's config)."""
    n = next(iter(groups.values())).num_ranks
    return placement_group([colocated_bundle(groups)] * n, strategy=strategy,
                           name="colocated-" + "-".join(groups) + f"-{os.getpid()}-{time.monotonic_ns()}")


def colocated_bundle(groups: dict[str, GroupResources]) -> dict[str, float]:
    """What one bundle holds: the sum of the groups' per-rank requests (one group: its own bundle)."""
    cpus = sum(g.num_cpus_per_rank for g in groups.values())
    gpus = sum(g.num_gpus_per_rank for g in groups.values())
    return {"CPU": cpus} | ({"GPU": gpus} if gpus else {})


def gather(refs: list) -> list:
    """ray.get that fails as soon as any call fails: when one rank of a collective dies, the others
    may wait for it forever, and a plain ray.get on the list would wait with them."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # raises the failure, if it is one
    return ray.get(refs)
