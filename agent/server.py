"""The agent process: listen for VMMs, keep the broker stream, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from hyperbroker.agent.core import Agent, AgentConfig
from hyperbroker.agent.metrics import AGENT
from hyperbroker.runtime import loglimit, metrics

log = logging.getLogger("hyperbroker.agent")


async def run_agent(config: AgentConfig) -> int:
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.tls is not None:
        loop.add_signal_handler(signal.SIGHUP, agent.link.reload_tls)
    await agent.start()
    metrics_port = None
    if config.metrics_listen:
        metrics_port = metrics.serve(config.metrics_listen, AGENT)
    print(f"hyperbroker agent {config.host_id} ready: broker {config.broker}"
          + (f" socket {config.socket_path}" if config.socket_path else "")
          + (f" stream-socket {config.stream_socket_path}" if config.stream_socket_path else "")
          + (f" metrics on :{metrics_port}" if metrics_port else ""), flush=True)
    await stop.wait()
    log.info("stopping")
    await agent.stop()
    loglimit.SHARED.flush()  # what the log limiter held back since its last summaries
    return 0
