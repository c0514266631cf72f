"""Adapter hit rate at a scale this machine cannot hold: 1,000 adapters, Zipf popularity, N replicas.

Run:  python -m bench.affinity_sim            (prints a Markdown table; a few seconds)

Each replica keeps an LRU of ``capacity`` adapters (a "hit" is a request whose adapter is already
loaded on the replica that serves it; a miss costs a fetch and a merge). Policies:

- ``random``: any replica, uniformly (what a plain load balancer does);
- ``affinity``: a replica that holds the adapter if one does (the least busy of them), else the replica
  holding the fewest adapters, as Ray Serve's multiplexed routing does;
- ``hash``: a fixed replica per adapter (consistent hashing), for reference.

It also reports how unevenly ``affinity`` spreads load (the busiest replica's share of requests over
an even share), because concentrating a popular adapter on one replica is the price of hits: Serve
sends a request elsewhere when the holder is at ``max_ongoing_requests``, which this sim ignores.
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass
class Result:
    hit_rate: float
    max_load_over_even: float


class Replica:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: OrderedDict[int, None] = OrderedDict()
        self.served = 0

    def serve(self, adapter: int) -> bool:
        self.served += 1
        if adapter in self.held:
            self.held.move_to_end(adapter)
            return True
        self.held[adapter] = None
        if len(self.held) > self.capacity:
            self.held.popitem(last=False)
        return False


def zipf_draws(adapters: int, exponent: float, requests: int, rng: random.Random) -> list[int]:
    """``requests`` adapter ids, adapter ``k`` (0-based) with probability proportional to 1/(k+1)^s."""
    cumulative = list(itertools.accumulate(1.0 / (rank**exponent) for rank in range(1, adapters + 1)))
    return rng.choices(range(adapters), cum_weights=cumulative, k=requests)


def simulate(
    policy: str, replicas: int, capacity: int, exponent: float, requests: int, adapters: int, seed: int
) -> Result:
    rng = random.Random(seed)
    pool = [Replica(capacity) for _ in range(replicas)]
    window: Counter[int] = Counter()  # recent requests per replica, standing in for "busy"
    hits = 0
    for step, adapter in enumerate(zipf_draws(adapters, exponent, requests, rng)):
        if policy == "random":
            index = rng.randrange(replicas)
        elif policy == "hash":
            index = hash((adapter, seed)) % replicas
        else:
            holders = [i for i, replica in enumerate(pool) if adapter in replica.held]
            if holders:
                index = min(holders, key=lambda i: (window[i], rng.random()))
            else:
                index = min(range(replicas), key=lambda i: (len(pool[i].held), window[i], rng.random()))
        hits += pool[index].serve(adapter)
        window[index] += 1
        if step % 64 == 63:
            window.clear()
    busiest = max(replica.served for replica in pool)
    return Result(hit_rate=hits / requests, max_load_over_even=busiest / (requests / replicas))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.8, 1.1])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--capacities", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        "| Zipf s | replicas | LRU per replica | random hit | affinity hit | hash hit | affinity busiest/even |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for exponent in args.exponents:
        for capacity in args.capacities:
            for replicas in args.replicas:
                results = {
                    policy: simulate(
                        policy, replicas, capacity, exponent, args.requests, args.adapters, args.seed
                    )
                    for policy in ("random", "affinity", "hash")
                }
                print(
                    f"| {exponent} | {replicas} | {capacity} | {results['random'].hit_rate:.1%} | "
                    f"{results['affinity'].hit_rate:.1%} | {results['hash'].hit_rate:.1%} | "
                    f"{results['affinity'].max_load_over_even:.2f} |"
                )


if __name__ == "__main__":
    main()
