"""Hardware telemetry: live readings, a seeded fake for tests, a background load."""

from casrap.telemetry.live import FakeTelemetry, LiveTelemetry, Telemetry, TelemetryReading
from casrap.telemetry.load import BackgroundLoad, LoadSchedule

__all__ = ["FakeTelemetry", "LiveTelemetry", "Telemetry", "TelemetryReading", "BackgroundLoad", "LoadSchedule"]
