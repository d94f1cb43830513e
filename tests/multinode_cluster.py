"""A Ray cluster of several nodes on this machine, for tests/test_multinode.py: a head without CPUs (so no actor
lands beside the driver) and `n` worker nodes, each its own raylet and object store (ray.cluster_utils.Cluster).
Prints the address, then runs until its stdin closes. With STAGING_ROOT, node i's processes stage checkpoint files
in STAGING_ROOT/node<i> (RLHF_STAGING_DIR), standing in for each node's own disk.

    python tests/multinode_cluster.py N CPUS_PER_NODE [STAGING_ROOT]
"""

import sys

from ray.cluster_utils import Cluster


def main() -> None:
    n, cpus = int(sys.argv[1]), float(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    staging = sys.argv[3] if len(sys.argv) > 3 else None
    for i in range(n):
        env = {"RLHF_STAGING_DIR": f"{staging}/node{i}"} if staging else None
        cluster.add_node(num_cpus=cpus, env_vars=env)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()


if __name__ == "__main__":
    main()
