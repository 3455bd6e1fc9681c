"""A faithful simulated Asterisk 22.10.1 for tests, the demo and benchmarks: whole calls, no PBX.

``AsteriskSimulator`` serves ARI (REST + events WebSocket) on one loopback port, creates
ExternalMedia legs that really exchange RTP or AudioSocket with the agent, plays files, and hands
out ``SimulatedCaller`` objects that speak into calls and record what they heard.
"""

from twisted_agent.sim.asterisk import AsteriskSimulator
from twisted_agent.sim.caller import SimulatedCaller
from twisted_agent.sim.model import ari_timestamp
from twisted_agent.sim.rest import Route
from twisted_agent.sim.routes import ASTERISK_VERSION, ROUTES

__all__ = ["ASTERISK_VERSION", "ROUTES", "AsteriskSimulator", "Route", "SimulatedCaller", "ari_timestamp"]
