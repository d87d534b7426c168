"""Profiles: named pruning plans and the bank that switches between them."""

from casrap.profiles.bank import Profile, ProfileBank
from casrap.profiles.catalogue import CASRAP_V22, FULL, TRADE_OFF, build_plan, parse_spec
from casrap.profiles.plan import PruningPlan

__all__ = ["Profile", "ProfileBank", "CASRAP_V22", "FULL", "TRADE_OFF", "build_plan", "parse_spec", "PruningPlan"]
