"""The gateway's configuration beyond the consumers: its services and routes, the key-auth instance that
applies to each route, and the metering-and-billing plugin's entries, turned into what the core's
`set_gateway` takes.

model.py (what is read), entities.py (services, routes and plugin entries, as both sources give them),
plugin_config.py (the metering-and-billing plugin's config, both spellings), deck.py and admin_api.py
(the two sources), plugins_file.py (`--plugins FILE`), source.py (a credential source whose snapshots carry
the configuration made whole and checked), secrets.py (`api_token` references), core_config.py (the dict
for the core, and the checks that need the flags), options.py (flags and wiring).
"""
