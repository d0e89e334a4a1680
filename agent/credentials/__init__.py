"""The credential table: turns an API key into a Kong Consumer, kept in sync with the gateway.

table.py (digest-only table), key_auth.py (where key-auth looks for keys), deck.py and admin_api.py (the
two sources), sync.py (keeps the current table fresh in the background), options.py (flags and factory).
"""
