#!/bin/bash
# /kemari/run for tests/xen/lab/boot.sh: the netback gate test (test_linux_patches.py).
exec /kemari/files/netgate-test.sh /kemari/domu/vmlinuz /kemari/files/domu.cpio.gz
