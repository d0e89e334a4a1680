"""Passive API-metering agent for Kong Gateway.

The pipeline, one folder per stage:
source (capture file | live ring) -> tcp (reassembly) -> http (exchanges) -> metering (events) -> sink.
"""
