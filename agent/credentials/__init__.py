"""The credential table: turns an API key into a Kong Consumer, kept in sync with the gateway."""
