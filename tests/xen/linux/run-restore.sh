#!/bin/bash
# /kemari/run for tests/xen/lab/boot.sh: the restore test (test_linux_patches.py),
# with the patched backends from /kemari/modules and kemari-restore in /kemari/files.
exec /kemari/files/restore-test.sh /kemari/modules /kemari/domu/vmlinuz /kemari/files/domu.cpio.gz
