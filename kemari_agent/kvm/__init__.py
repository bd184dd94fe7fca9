"""The kvm hypervisor driver: Kemari's own micro-VMM on /dev/kvm."""
