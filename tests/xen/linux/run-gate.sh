#!/bin/bash
# /kemari/run for tests/xen/lab/boot.sh: the gate test (test_linux_patches.py).
exec /kemari/files/gate-test.sh /kemari/domu/vmlinuz /kemari/files/domu.cpio.gz /kemari/files/scsi
