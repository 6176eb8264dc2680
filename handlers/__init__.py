"""Handlers: one package per ABI. Each is a pure state machine plus a thin async adapter.

A handler never imports gRPC, sockets or processes; it sees a Call and a CallContext and returns
a Result (handlers.api).
"""
