"""Device backends of the kvm driver: one module per device, one small interface.

Every backend serves rings that live in guest memory (native/kemari_abi.h)
and keeps no state of its own that the guest depends on: after a restore or
a failover it *attaches* to the rings and redoes the requests in flight.
"""
