"""The gateway's configuration beyond the consumers: its services and routes, the key-auth instance that
applies to each route, and the metering-and-billing plugin's entries, turned into what the core's
`set_gateway` takes.

model.py (what is read), entities.py (services and routes), plugin_config.py (the metering-and-billing
plugin's config, both spellings), build.py (one configuration from a source's lists), deck.py and
admin_api.py (the two sources), plugins_file.py (`--plugins FILE`), secrets.py (`api_token` references),
core_config.py (the dict for the core), options.py (flags and wiring).
"""
