"""The central broker: gRPC server, sessions, dispatch, policy, store, metrics.

It knows handlers only through handlers.api and never how a VMM talks to the agent.
"""
