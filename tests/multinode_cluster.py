"""A Ray cluster of several nodes on this machine, for tests/test_multinode.py: a head without CPUs (so no actor
lands beside the driver) and `n` worker nodes, each its own raylet and object store (ray.cluster_utils.Cluster).
Prints the address, then runs until its stdin closes.

    python tests/multinode_cluster.py N CPUS_PER_NODE
"""

import sys

from ray.cluster_utils import Cluster


def main() -> None:
    n, cpus = int(sys.argv[1]), float(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(n):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()


if __name__ == "__main__":
    main()
