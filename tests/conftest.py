"""Test-session settings shared by every test module."""
import os

# A privacy product sends no telemetry, in tests too: Flower reads this when it is first imported,
# and the simulation tests import it in this process.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
