"""Metering: finds the API key as key-auth does, resolves the subject, applies the billing rules and
builds one Kong-compatible CloudEvent per billable exchange."""
