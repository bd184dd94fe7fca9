"""`make bench`: run every benchmark that docs/benchmarks.md quotes, in turn;
each prints its table and writes bench/results/NAME.json."""

from bench import (
    bench_checkpoint_stages,
    bench_cluster_failover,
    bench_codec,
    bench_full_sync,
    bench_handshake_crowd,
    bench_kv,
    bench_kv_timeline,
    bench_replication,
    bench_resync,
    bench_slow_checkpoints,
)

if __name__ == "__main__":
    bench_kv.main()
    bench_codec.main()
    bench_replication.main()
    bench_checkpoint_stages.main()
    bench_slow_checkpoints.main(["split CPUs", "split CPUs + CPU latency 0"])
    bench_kv_timeline.main(3.0, ["native", "no hot pages"])
    bench_handshake_crowd.main()
    bench_resync.main()
    bench_full_sync.main()
    bench_full_sync.auto_converge()
    bench_cluster_failover.main()
