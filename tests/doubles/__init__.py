"""Test doubles for the services the agent talks to but that cannot run here; each follows its OpenAPI
contract in ../shared/contracts/, errors included."""
