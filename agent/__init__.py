"""The per-host agent: the VMM endpoint, guest-memory mappings, the broker link, deadlines.

It never knows what a handler does: it forwards calls and applies results.
"""
