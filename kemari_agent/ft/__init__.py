"""Fault tolerance: the replication engine that drives the sans-I/O stream
(kemari_agent.replication) with a real VMM, and the per-VM daemon.

protector.py  primary side: full sync, then a checkpoint at every tapped event
receiver.py   secondary side: applies checkpoints into a standby VM's memory
activation.py failover: build the running guest from the last checkpoint
daemon.py     one process per VM: roles, transitions, the control socket
"""
