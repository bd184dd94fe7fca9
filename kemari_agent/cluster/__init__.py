"""Pacemaker integration: what the OCF agent `ocf:kemari:vm` and the fence-peer
handlers need (scores from status, node attributes, CIB constraints, corosync
node addresses). Everything here shells out to Pacemaker's own tools."""
