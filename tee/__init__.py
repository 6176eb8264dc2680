"""The reference TEE service: trusted applications behind the TEE-backend gRPC protocol.

`hyperbroker tee-serve` (tee.server.main) hosts trusted applications found through the
entry-point group `hyperbroker.trusted_apps` (tee.ta.discover_trusted_apps) and answers the OP-TEE
proxy (handlers/optee) over proto/hyperbroker/v1/tee.proto. It knows nothing of guests' memory,
SMC calls or the broker: a request names a VM, a session and parameters already copied in.
"""
