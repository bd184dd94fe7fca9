#!/bin/bash
# /kemari/run for tests/xen/lab/boot.sh: the attach test, with the backends
# boot.sh loaded from /kemari/modules (--modules) and the files
# test_linux_patches.py put in /kemari/files (--files).
exec /kemari/files/attach-test.sh /kemari/modules /kemari/domu/vmlinuz /kemari/files/domu.cpio.gz
