"""`make bench`: run every benchmark in turn."""

from bench import bench_cluster_failover, bench_codec, bench_kv

if __name__ == "__main__":
    bench_kv.main()
    bench_codec.main()
    bench_cluster_failover.main()
