"""kvtier's policy engine: block and session model, placement policies behind one interface, a
multi-tier simulator with a time-to-first-token cost model, and trace replay.

The daemon uses this package unchanged; `kvctl replay` drives it from Mooncake-format traces.
"""
from kvtier.policy.base import Policy
from kvtier.policy.model import BlockType, Request, Session, SessionState, Transition
from kvtier.policy.registry import DEFAULT_POLICY, make_policy, policy_class, policy_names

__all__ = ["Policy", "BlockType", "Request", "Session", "SessionState", "Transition", "DEFAULT_POLICY",
           "make_policy", "policy_class", "policy_names"]
