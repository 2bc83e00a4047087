"""Unit tests: no servers, no network, fast."""
